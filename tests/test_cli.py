"""The `moeserve` command's own behaviour (its subcommands' work is tested where it lives)."""

from __future__ import annotations

import io
import os
import sys

from moeserve import cli


def test_cli_stops_quietly_when_its_reader_closes_the_pipe(monkeypatch):
    """`moeserve status | head -3`: the reader closes the pipe before the status is written. The command ends
    with exit status 1 and no traceback, and nothing fails when stdout is flushed afterwards."""
    from moeserve.cluster import controller

    monkeypatch.setattr(controller, "fetch_status", lambda address, app: {"app": app})
    monkeypatch.setattr(controller, "format_status", lambda status: "rank 0: ok\n" * 100)
    read, write = os.pipe()
    os.close(read)
    out = io.TextIOWrapper(os.fdopen(write, "wb", buffering=0), write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert cli.main(["status"]) == 1
        out.write("after\n")  # the pipe's descriptor now writes to /dev/null
        out.flush()
    finally:
        out.close()
