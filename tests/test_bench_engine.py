"""The engine benchmark (benchmarks/offline_gpu.py) runs end to end on CPU with toy shapes: it drives the
engine through wrappers of its internals (the runner's launch, resolve), so a change of those interfaces shows
here rather than on the GPU box."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offline_gpu_script_runs_on_cpu_and_writes_its_tables(tmp_path):
    cmd = [sys.executable, "benchmarks/offline_gpu.py", "--tiny", "--device", "cpu", "--models", "qwen3-30b-a3b",
           "--skip-hf", "--skip-sync", "--steps", "1", "--num-requests", "2", "--decode-batches", "1,2",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "qwen3-30b-a3b.json").read_text())["result"]
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    assert all(row["engine_step_ms"] > 0 and row["roofline_ms"] > 0 for row in result["decode"])
    assert result["moeserve"]["seconds"] > 0
    assert "| engine | batch | seconds |" in run.stdout
