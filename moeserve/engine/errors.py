"""Errors the engine raises across process boundaries (light to import: no torch)."""


class EngineLoopFailed(RuntimeError):
    """An engine's step loop died; its requests cannot finish (the worker group must restart)."""
