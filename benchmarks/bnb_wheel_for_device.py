"""bitsandbytes' wheel, slimmed for the device call's carry (64 MiB with the other wheels): the
published wheel (43 MB) holds a library per CUDA version; the device runs CUDA 13.0, so the copy keeps
the CPU library and `libbitsandbytes_cuda130.so` only (4 MB), their RECORD lines with them.

    pip download bitsandbytes==0.50.2 --no-deps -d /tmp/bnb
    python benchmarks/bnb_wheel_for_device.py /tmp/bnb/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl .whl/
"""

from __future__ import annotations

import argparse
import pathlib
import re
import zipfile

KEPT_LIBRARIES = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")


def slim(wheel: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """A copy of `wheel` in `directory` (same name) without the native libraries KEPT_LIBRARIES leaves out."""
    target = directory / wheel.name
    if target.resolve() == wheel.resolve():
        raise ValueError(f"{target}: would write over the input wheel; name another directory")
    dropped = set()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target.with_suffix(".part"), "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            if item.filename.endswith(".so") and not KEPT_LIBRARIES.search(item.filename):
                dropped.add(item.filename)
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
            out.writestr(item, data)
    target.with_suffix(".part").replace(target)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("wheel", type=pathlib.Path)
    parser.add_argument("directory", type=pathlib.Path)
    args = parser.parse_args()
    print(slim(args.wheel, args.directory))
