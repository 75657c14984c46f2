"""Running a test file's `test_interp_*` tests under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so a test file marks its interpreter tests with
`interp` (they skip in the normal run) and calls `run_interpreter_tests(__file__)` from one ordinary test,
which re-runs them in a fresh subprocess with the variable set. The interpreter is right for fp32 and fp16
but not bf16, so those tests use fp32/fp16 inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")


def run_interpreter_tests(test_file: str) -> None:
    """Run test_file's `test_interp_*` tests in a subprocess under the interpreter; fail if any fails or none
    ran (skip when already inside that subprocess)."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "test_interp_"]
    # A guard against a hang, well above the longest run: test_kernels_moe.py's take 9.5-10 minutes on the
    # 2-core CI box (the 600 s this was before cut one off in session 18).
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
