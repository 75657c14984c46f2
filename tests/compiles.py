"""Triton compilations seen through its JIT hook: what a GPU test checks never happens after a warm-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def recorded_compilations() -> Iterator[list[str]]:
    """Yields a list that gets "kernel: specialisation" for each kernel variant Triton compiles (or loads
    from its disk cache) inside the block; kernels compile as usual."""
    import triton

    compiled: list[str] = []

    def record(*, fn, repr, **_) -> bool:  # noqa: A002 - Triton's keyword
        compiled.append(f"{fn.name}: {repr[:300]}")
        return False

    runtime = triton.knobs.runtime
    hook, runtime.jit_cache_hook = runtime.jit_cache_hook, record
    try:
        yield compiled
    finally:
        runtime.jit_cache_hook = hook
