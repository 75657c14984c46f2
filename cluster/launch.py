"""Deploy moeserve on a Ray cluster and keep it up until stopped: the `ray job submit` entrypoint.

    ray job submit --working-dir . -- python -m moeserve.cluster.launch --config deploy.yaml [--detach]

Connects to the cluster (RAY_ADDRESS, which `ray job submit` sets, or --address), starts Serve's HTTP proxy
on `http.host:http.port`, deploys the app named `app_name`, waits until its /health answers 200 and prints the
URL. Without --detach it then stays up until SIGINT/SIGTERM (`ray job stop` sends SIGTERM) and deletes the
app; with --detach it returns 0 once healthy and the app keeps running (`--delete` removes it later).

`ray job stop` kills the entrypoint 3 s after SIGTERM unless the cluster sets RAY_JOB_STOP_WAIT_TIME_S: the
delete is requested first thing, so Serve finishes it even if this process is killed while waiting.
`moeserve serve` runs the same code against a local Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time

import httpx
import ray
from ray import serve

from moeserve.cluster.config import DeployConfig, load_deploy_config

logger = logging.getLogger("moeserve")

HEALTH_POLL_S = 0.5
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(\(\w+\))?: (?!Traceback)")


def connect(address: str | None, *, start_local: bool, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at address / $RAY_ADDRESS. Without either: start a local Ray in this process
    (start_local), else join the cluster running on this machine (as `ray status` does). Returns whether a
    local Ray was started here."""
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **quiet)
        return False
    if start_local:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address="auto", **quiet)
    except ConnectionError:
        raise ConnectionError(
            "no Ray cluster found on this machine; set RAY_ADDRESS or pass --address"
        ) from None
    return False


def local_num_cpus(config: DeployConfig) -> int:
    """CPU slots for a local Ray: at least one per CPU rank plus the ingress and controller replicas."""
    needed = config.ingress.replicas * config.ingress.num_cpus + 0.1
    if config.device != "cuda":
        needed += config.parallel.dp
    return max(os.cpu_count() or 1, int(needed) + 1)


def base_url(config: DeployConfig) -> str:
    host = config.http.host
    if host in ("0.0.0.0", "::"):
        host = ray.util.get_node_ip_address()
    return f"http://{host}:{config.http.port}{config.route_prefix.rstrip('/')}"


def deploy(config: DeployConfig, timeout_s: float) -> str:
    """Start Serve's HTTP proxy, deploy the app, wait for /health; returns the app's base URL."""
    from moeserve.cluster.app import build_app

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    app = build_app(config)
    deadline = time.monotonic() + timeout_s
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    runner = threading.Thread(target=run, name="moeserve-deploy", daemon=True)
    runner.start()
    runner.join(timeout_s)
    if errors:
        raise RuntimeError(
            f"deploying app {config.app_name!r} failed: {errors[0]} {_app_message(config.app_name)}"
        ) from None
    if runner.is_alive():
        raise TimeoutError(
            f"app {config.app_name!r} was not running after {timeout_s:.0f}s: {_app_message(config.app_name)}"
        )
    url = base_url(config)
    wait_healthy(url, max(deadline - time.monotonic(), 1.0))
    return url


def wait_healthy(url: str, timeout_s: float) -> None:
    """Until GET url/health answers 200; TimeoutError naming the last answer otherwise."""
    health = url.replace("://0.0.0.0", "://127.0.0.1") + "/health"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            response = httpx.get(health, timeout=10.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{health} did not answer 200 within {timeout_s:.0f}s (last: {last}); if Serve was already "
                "running on this cluster with other HTTP options, those apply (see `serve status`)"
            )
        time.sleep(HEALTH_POLL_S)


def _app_message(app_name: str) -> str:
    try:
        app = serve.status().applications.get(app_name)
    except Exception as exc:
        return f"(Serve status unavailable: {exc})"
    if app is None:
        return "not deployed"
    details = "; ".join(
        f"{name}: {d.status.value} {_root_cause(d.message)}".strip() for name, d in app.deployments.items()
    )
    return f"({app.status.value}: {details})"


def _root_cause(message: str) -> str:
    """The last `SomeError: ...` line of a replica's traceback (Serve reports the whole traceback)."""
    errors = [line for line in message.splitlines() if _ERROR_LINE.match(line)]
    return errors[-1] if errors else message.splitlines()[0] if message else ""


def delete_app(app_name: str, timeout_s: float = 60.0) -> bool:
    """Ask Serve to delete the app (at once, so it completes even if this process dies), then wait for it.
    Returns whether it is gone."""
    try:
        serve.delete(app_name, _blocking=False)
    except Exception:
        logger.warning("deleting app %r failed", app_name, exc_info=True)
        return False
    deadline = time.monotonic() + timeout_s
    while app_name in _app_names():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _app_names() -> set[str]:
    try:
        return set(serve.status().applications)
    except Exception:  # Serve itself is gone: so is every app
        return set()


def delete_named_app(app_name: str) -> int:
    if app_name not in _app_names():
        print(f"moeserve: no app named {app_name!r} is running", file=sys.stderr)
        return 1
    gone = delete_app(app_name)
    print(f"moeserve: app {app_name!r} {'deleted' if gone else 'deletion requested'}", flush=True)
    return 0 if gone else 1


def wait_for_stop() -> str:
    """Block until SIGINT or SIGTERM; returns the signal's name."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    stop.wait()
    return received[0]


def serve_until_stopped(config: DeployConfig, *, detach: bool, timeout_s: float, started_ray: bool) -> int:
    """Deploy, print the URL, then (unless detach) wait for a stop signal and tear the app down."""
    try:
        url = deploy(config, timeout_s)
    except BaseException:  # failed, timed out or interrupted: leave nothing half-deployed holding resources
        delete_app(config.app_name, timeout_s=30.0)
        if started_ray:
            serve.shutdown()
        raise
    print(
        f"moeserve: app {config.app_name!r} serving model {config.model_name!r} at {url} "
        f"(OpenAI API at {url}/v1)",
        flush=True,
    )
    if detach:
        return 0
    name = wait_for_stop()
    print(f"moeserve: {name} received, deleting app {config.app_name!r}", flush=True)
    gone = delete_app(config.app_name)
    if started_ray:
        serve.shutdown()
    print(f"moeserve: app {config.app_name!r} {'deleted' if gone else 'deletion requested'}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moeserve.cluster.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="deploy.yaml (see examples/deploy.yaml)")
    p.add_argument("--detach", action="store_true", help="return once the app is healthy; leave it running")
    p.add_argument("--delete", action="store_true", help="delete the config's app (e.g. a detached one) and exit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the app to be healthy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_deploy_config(args.config)
        connect(args.address, start_local=False)
        if args.delete:
            return delete_named_app(config.app_name)
        return serve_until_stopped(config, detach=args.detach, timeout_s=args.timeout, started_ray=False)
    except (ValueError, ConnectionError, TimeoutError, RuntimeError) as exc:
        print(f"moeserve launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
