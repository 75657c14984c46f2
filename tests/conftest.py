"""Shared pytest set-up: GPU markers skip without CUDA; tiny checkpoints are built once per session; the
Triton-interpreter subprocesses start at collection and their tests run last (tests/interp.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.interp import start_interpreter_runs, stop_interpreter_runs

# Tiny models on a small shared CPU: one thread per process is far faster than several competing ones.
# Ray workers and subprocesses inherit the environment variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs at least 2 CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and num_gpus < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and num_gpus < 2:
            item.add_marker(skip_multi)
    # The tests that wait for an interpreter subprocess go last: their subprocesses run meanwhile (tests/interp.py).
    items.sort(key=lambda item: "interpreter_run" in item.keywords)


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        start_interpreter_runs(str(item.path) for item in session.items if "interpreter_run" in item.keywords)


def pytest_sessionfinish(session, exitstatus):
    stop_interpreter_runs()


@pytest.fixture(scope="session")
def gpu_ep_ranks() -> int:
    """DP = EP ranks for the multi-GPU tests: the visible GPUs rounded down to 2, 4 or 8 (a power of two
    divides the tiny models' experts, redundant ones included)."""
    return 1 << (min(torch.cuda.device_count(), 8).bit_length() - 1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """build(arch, **overrides) -> path of a tiny random HF checkpoint, cached per (arch, overrides)."""
    from moeserve.testing.tiny_checkpoints import build_tiny_checkpoint

    cache: dict = {}

    def build(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            cache[key] = build_tiny_checkpoint(arch, path, **overrides)
        return cache[key]

    return build
