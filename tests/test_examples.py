"""The examples README points users at run end to end (the README's demo command runs
examples/quickstart.py): a renamed API breaks them here, not in a user's first minute."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["examples/quickstart.py"],  # what README's demo command runs: every scheme
    ["examples/export_and_ship.py", "--scheme", "fp8_rowwise"],
], ids=["quickstart", "export_and_ship"])
def test_example_runs(command, tmp_path):
    extra = ["--out", str(tmp_path / "ship")] if "export_and_ship" in command[0] else []
    result = subprocess.run([sys.executable, *command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
