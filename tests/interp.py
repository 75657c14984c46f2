"""Running a test file's `test_interp_*` tests under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so a test file marks its interpreter tests with
`interp` (they skip in the normal run) and calls `run_interpreter_tests(__file__)` from one ordinary test,
which re-runs them in a fresh subprocess with the variable set. The interpreter is right for fp32 and fp16
but not bf16, so those tests use fp32/fp16 inputs.

These subprocesses are most of a CPU run's time (test_kernels_moe.py's alone 9.5-10 minutes on the 2-core CI
box), and they need no other test. So the launching test carries `launches_interpreter_run`: once collection is
done, conftest starts the selected files' runs (`start_interpreter_runs`) on a background thread, one after
another in the session's order, and moves the launching tests to the end of the session. The runs use the
second core while the rest of the session runs; each launching test then waits for its own result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")

# A guard against a hang, well above the longest run (the 600 s this was before cut one off in session 18).
TIMEOUT_S = 1800


def launches_interpreter_run(test):
    """Marks the test that calls `run_interpreter_tests` (see the module's docstring). Its wait for the run is
    bounded by the run's own guard rather than the session's per-test timeout."""
    return pytest.mark.timeout(2 * TIMEOUT_S)(pytest.mark.interpreter_run(test))


class _Run:
    """One file's interpreter subprocess, run on the background thread (`start_interpreter_runs`) or by its
    launching test (`run_interpreter_tests`)."""

    def __init__(self, test_file: str) -> None:
        self.test_file = test_file
        self.done = threading.Event()
        self.returncode: int | None = None
        self.output = ""
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()  # no subprocess starts once stop() has run

    def run(self) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", self.test_file, "-k", "test_interp_"]
        with tempfile.TemporaryFile(mode="w+") as out:
            try:
                with self._lock:
                    if not self._stopped:
                        self._proc = subprocess.Popen(cmd, env=dict(os.environ, TRITON_INTERPRET="1"), stdout=out,
                                                      stderr=subprocess.STDOUT, text=True)
                if self._proc is not None:
                    self.returncode = self._proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                out.write(f"\n(killed after {TIMEOUT_S} s)")
            finally:
                out.seek(0)
                self.output = out.read()
                self.done.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


_runs: dict[str, _Run] = {}


def start_interpreter_runs(test_files: Iterable[str]) -> None:
    """Run these files' interpreter subprocesses one after another on a background thread, in the order given
    (files already started or run are left out)."""
    files = [] if INTERP else [os.path.realpath(f) for f in test_files]
    queue = [_runs.setdefault(f, _Run(f)) for f in dict.fromkeys(files) if f not in _runs]
    if queue:
        threading.Thread(target=lambda: [r.run() for r in queue], name="interpreter-runs", daemon=True).start()


def stop_interpreter_runs() -> None:
    """Kill what is still running or queued (the session ends, e.g. after a failure with -x)."""
    for r in _runs.values():
        r.stop()


def run_interpreter_tests(test_file: str) -> None:
    """Run test_file's `test_interp_*` tests in a subprocess under the interpreter (or wait for the run
    conftest started); fail if any fails or none ran (skip when already inside that subprocess)."""
    if INTERP:
        pytest.skip("already inside the interpreter run")
    test_file = os.path.realpath(test_file)
    run = _runs.get(test_file)
    if run is None:  # not started at collection: run it here
        run = _runs[test_file] = _Run(test_file)
        run.run()
    assert run.done.wait(timeout=2 * TIMEOUT_S), f"{test_file}: its interpreter run never finished"
    out = run.output
    assert run.returncode == 0, out[-9000:]
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]
