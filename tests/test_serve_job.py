"""The deployment path users run: a Ray head started with `ray start`, `ray job submit` of the launch
entrypoint, HTTP queries against the app it deploys, `ray job stop` deleting the app, then the head stopped.

The head runs as `ray start --head --block`, a child of this test: terminating it stops exactly this cluster
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

pytest.importorskip("ray.dashboard")
yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "moeserve-job"
# What the job does not need from the repository; .gitignore'd paths are left out by Ray already.
EXCLUDES = [".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "benchmarks/out"]


def wait_until(condition, timeout_s: float) -> bool:
    """Poll an outside system (cluster, HTTP endpoint) until condition() holds; False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# Ray's token authentication (on by default for new clusters), with a token of this test's own, passed to the
# head and to every CLI through the environment (the job inherits it from the head).
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
# Nothing is serving once the test ends: the head may stop at once instead of draining for half a minute.
ENV["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"


def run_cli(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def ray_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("ray", *args, timeout=timeout)


def answers(url: str, status: int | str | None = 200) -> bool:
    """Whether GET url answers `status`; status None: nothing listens there (or any status: "any")."""
    try:
        got = httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return status is None
    return status == "any" or got == status


@pytest.fixture(scope="module")
def head():
    """A local Ray head with the dashboard (the jobs API lives there); yields (gcs address, dashboard URL)."""
    temp_dir = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray puts unix sockets under it
    proc = None
    try:
        for attempt in range(3):
            gcs_port, dashboard_port = free_port(), free_port()
            cmd = [
                str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
            dashboard = f"http://127.0.0.1:{dashboard_port}"
            url = f"{dashboard}/api/version"
            assert wait_until(lambda p=proc, u=url: answers(u, "any") or p.poll() is not None, 180), (
                f"the Ray head answered nothing in 180 s: {cmd}")
            if proc.poll() is None:
                break
            # Ray draws its other components' ports at random and refuses a chosen port that one of them drew
            # (seen once in CI): start again on fresh ports. Anything else fails the test with Ray's output.
            output = proc.stdout.read()
            assert "used by other components" in output and attempt < 2, output
        yield f"127.0.0.1:{gcs_port}", dashboard
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every process of its node, then exits
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_serves_and_job_stop_deletes_the_app(head, tiny_checkpoint, tmp_path):
    gcs, dashboard = head
    port = free_port()
    config = {
        "app_name": APP, "model": str(tiny_checkpoint("qwen3_moe")), "served_model_name": "tiny",
        "device": "cpu", "parallel": {"dp": 2, "ep": 2}, "engine": {"num_kv_blocks": 512},
        "http": {"host": "127.0.0.1", "port": port},
    }
    config_file = tmp_path / "deploy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    job_id = f"moeserve-test-{port}"
    submit = ray_cli(
        "job", "submit", "--address", dashboard, "--no-wait", "--submission-id", job_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", sys.executable, "-m", "moeserve.cluster.launch", "--config", str(config_file),
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def job_status() -> str:
        done = ray_cli("job", "status", "--address", dashboard, job_id, timeout=60)
        text = (done.stdout + done.stderr).lower()
        # The CLI says "... succeeded", "... was stopped", "... failed", else "Status for job ...: RUNNING".
        return next((w for w in ("running", "pending", "succeeded", "stopped", "failed") if w in text), text)

    def job_logs() -> str:
        return ray_cli("job", "logs", "--address", dashboard, job_id, timeout=60).stdout

    url = f"http://127.0.0.1:{port}"
    up = wait_until(lambda: answers(f"{url}/health"), 300)
    assert up, f"the app never became healthy; job logs:\n{job_logs()}"
    # The entrypoint prints its URL once it sees the app healthy (the log may lag our own health check).
    assert wait_until(lambda: f"moeserve: app '{APP}' serving model 'tiny' at {url}" in job_logs(), 60), job_logs()
    assert job_status() == "running"

    body = {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 5, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    status = run_cli("moeserve", "status", "--address", gcs, "--app", APP, timeout=120)
    assert status.returncode == 0 and "2 ranks (ep 2, cpu), state up" in status.stdout, status.stderr

    stop = ray_cli("job", "stop", "--address", dashboard, job_id)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_status() == "stopped"
    # The entrypoint deletes the app on SIGTERM: its route is gone (404 from Serve's proxy, or refused).
    assert wait_until(lambda: answers(f"{url}/health", 404) or answers(f"{url}/health", None), 120)

    def app_listed() -> bool:
        return APP in run_cli("serve", "status", "--address", dashboard, timeout=120).stdout

    assert wait_until(lambda: not app_listed(), 60), "the app is still listed by `serve status`"
    assert wait_until(lambda: f"SIGTERM received, deleting app '{APP}'" in job_logs(), 60), job_logs()
