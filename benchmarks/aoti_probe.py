"""Why AOTInductor packages do not run on the device: compile a plain nn.Linear (no fxquant) into a
package and load it, each step in a fresh process with faulthandler on, and say which step dies
and how. On the lent H100 with torch 2.11.0+cu130 loading died with SIGSEGV in `_load_aoti`, in
every variant tests/kernels/test_cuda_export.py tries; this narrows it down (GPU only):

    python benchmarks/aoti_probe.py              # as the tests run: with the carried packages on PYTHONPATH
    env -u PYTHONPATH python benchmarks/aoti_probe.py --no-carried   # torch's own environment only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

COMPILE = """
import sys, torch
model = torch.nn.Linear(64, 64).cuda()
x = torch.randn(4, 64, device="cuda")
program = torch.export.export(model, (x,))
print(torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[1]))
"""

LOAD = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
print("loaded")
print(runner(torch.randn(4, 64, device="cuda")).shape)
"""

STEPS = {
    "compile": COMPILE,
    "load and run": LOAD,
    "load with device_index=0": LOAD.replace("aoti_load_package(sys.argv[1])", "aoti_load_package(sys.argv[1], device_index=0)"),
    "load single-threaded": LOAD.replace("aoti_load_package(sys.argv[1])", "aoti_load_package(sys.argv[1], run_single_threaded=True)"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-carried", action="store_true", help="label: run without the carried packages")
    args = parser.parse_args()
    import torch

    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    print(f"torch {torch.__version__} | CUDA {torch.version.cuda} | {compiler} | "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}{' (unset)' if args.no_carried else ''}")
    package = os.path.join(tempfile.mkdtemp(), "plain.pt2")
    for step, code in STEPS.items():
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, package],
                              capture_output=True, text=True, timeout=300)
        print(f"== {step}: exit {done.returncode}")
        print("\n".join((done.stdout + done.stderr).strip().splitlines()[-25:]))
        if done.returncode != 0 and step == "compile":
            return


if __name__ == "__main__":
    main()
