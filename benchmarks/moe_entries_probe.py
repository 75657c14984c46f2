"""Fused-MoE table entries against their neighbours' tiles and nearby tiles; optionally the count + scatter align
with the memset launch that zeroed its scratch before session 7.

    python benchmarks/moe_entries_probe.py [--cases default|ep|short|qwen3:bf16:512,...] [--memset] [--short]
        [--only REGEX] [--out F.json]

A case is shape key:dtype:M (shape keys of `kernels.SHAPES`); `--cases default` is CASES, `--cases ep` is
EP_CASES: one Qwen3-30B-A3B rank at expert parallelism 2/4/8 (64/32/16 of 128 experts, all-gather rows).
Without a table of its own such a rank takes the E128 table's entry (`get_config`'s global_experts); its
cases also time "heuristic" (the `default_config` pick, what the code took before that lookup existed) and,
once a local table exists, "unsharded table". `--cases ep-a2a` is EP_A2A_CASES: the EP 4/8 ranks fed by the
all-to-all (only the M tokens' rows with a choice here arrive), whose "table" entry is the one the code now
picks (keyed on the choices, `moe_configs.lookup_tokens`, M in expectation), timed against "keyed on rows"
(the entry for the rows' expected count, what the code picked before).

Whole `fused_moe` calls under CUDA-graph replay over the routings `kernels.rotating_inputs` gives: each case's
table entry and the configs of EXTRA, timed alternately REPEATS times so clock drift hits all alike; fractions
against max(bytes / copy bandwidth, FLOPs / matmul rate) measured in this run. `--memset` also times every
variant with the align's scratch in a fresh zeroed buffer per call (one memset node more in the graph), as the
code had it before. Every kernel is compiled first, in parallel processes (`kernels_moe_tune.precompile`); the
script exits non-zero when a variant fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import (  # noqa: E402
    alternate_us,
    precompile,
    roofline_us,
    short_candidates,
    whole_jobs,
    with_overlap,
    with_short_m,
    with_swap_ab,
    with_tail_m,
    with_tiles,
)

from kernels import SHAPES, MoEShape, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.moe_configs import GemmConfig as G  # noqa: E402
from moeserve.kernels.moe_configs import (  # noqa: E402
    MoEConfig,
    default_config,
    get_config,
    load_table,
    table_name,
)
from moeserve.kernels.moe_tiles import overlap_applies  # noqa: E402

# The module, not the function `moeserve.kernels.moe_align` the package exports under the same name.
align_mod = importlib.import_module("moeserve.kernels.moe_align")

# Where the Qwen3 bf16 entries (128: block_m 16; 256: block_m 32; 512: block_m 64) meet under the nearest-M
# lookup, and the two M=512 cases the entries were chosen on.
CASES = "qwen3:bf16:192,qwen3:bf16:224,qwen3:bf16:384,qwen3:bf16:768,qwen3:bf16:512,qwen3:fp8:512"
# Qwen3 EP ranks: the E128 table's entry against the heuristic they took before (M = all-gather rows).
EP_CASES = ("qwen3-ep2:bf16:256,qwen3-ep2:bf16:1024,qwen3-ep2:bf16:4096,"
            "qwen3-ep4:bf16:512,qwen3-ep4:bf16:2048,"
            "qwen3-ep8:bf16:512,qwen3-ep8:bf16:2048,qwen3-ep8:bf16:8192,qwen3-ep8:fp8:2048")
EP_A2A_CASES = ("qwen3-ep8-a2a:bf16:256,qwen3-ep8-a2a:bf16:512,qwen3-ep8-a2a:bf16:1024,"
                "qwen3-ep4-a2a:bf16:256,qwen3-ep4-a2a:bf16:1024")
# Where an expert's last 64- or 128-row block is often mostly padding (pairs per expert near a block multiple),
# then sizes between table entries, where a block fills half its rows or less.
SHORT_CASES = ("qwen3:bf16:2048,mixtral:bf16:512,qwen3:fp8:2048,mixtral:fp8:512,deepseek:bf16:2048,"
               "deepseek:bf16:8192,qwen3:bf16:8192,mixtral:bf16:2048,qwen3:bf16:512,qwen3:fp8:512,"
               "qwen3:bf16:256,qwen3:bf16:1024,qwen3:bf16:4096,deepseek:bf16:1024,mixtral:bf16:256,mixtral:bf16:1024")
CASE_SETS = {"default": CASES, "ep": EP_CASES, "ep-a2a": EP_A2A_CASES, "short": SHORT_CASES}
_BM16 = MoEConfig(16, G(32, 256, 1, 4, 3), G(128, 128, 1, 4, 3))  # the bf16 table's M=128 entry
_BM32 = MoEConfig(32, G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 3))  # its M=256 entry (M=512 before session 7)
_BM64 = MoEConfig(64, G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 4))  # its M=512 entry
_BM128 = MoEConfig(128, G(128, 64, 8, 8, 4), G(256, 64, 8, 8, 4))  # its M=2048 entry
_FP8 = dict(gu=G(128, 128, 8, 8, 4), dn=G(128, 128, 8, 4, 4))  # the fp8 table's M=512 tiles
_MIX128 = MoEConfig(64, G(64, 128, 8, 8, 3), G(128, 128, 8, 8, 3))  # the Mixtral bf16 table's M=128 entry
# The Mixtral bf16 table's M=2048 tiles with short tiles: they won at M=768-1280 in session 11 (and became its
# M=1024 entry); timed in session 12 at M=256-512: slower there.
_MIX2048_SHORT = with_short_m(SHAPES["mixtral"].table_config(2048, False), 32)
# Configs timed besides the table entry (label -> config).
EXTRA = {
    "qwen3:bf16:192": {"M=128 entry (block_m 16)": _BM16},
    "qwen3:bf16:224": {"M=128 entry (block_m 16)": _BM16},
    "qwen3:bf16:384": {"M=256 entry (block_m 32)": _BM32},
    "qwen3:bf16:768": {"M=256 entry (block_m 32)": _BM32, "M=2048 entry (block_m 128)": _BM128},
    # Where the M=512 and M=2048 entries meet (1024 on the log scale).
    **{f"qwen3:bf16:{m}": {"M=512 entry (block_m 64)": _BM64, "M=2048 entry (block_m 128)": _BM128}
       for m in (1024, 1280, 1536)},
    "qwen3:bf16:512": {
        "M=256 entry (block_m 32)": _BM32,
        "gate/up k64 8 stages": MoEConfig(64, G(64, 64, 1, 4, 8), _BM64.down),
        "down k64 6 stages": MoEConfig(64, _BM64.gate_up, G(128, 64, 1, 4, 6)),
    },
    "qwen3:fp8:512": {
        "gate/up 3 stages (before session 7)": MoEConfig(64, G(128, 128, 8, 8, 3), _FP8["dn"]),
        "gate/up group_m 1": MoEConfig(64, G(128, 128, 1, 8, 4), _FP8["dn"]),
        "down 8 warps": MoEConfig(64, _FP8["gu"], G(128, 128, 8, 8, 4)),
        "gate/up 5 stages": MoEConfig(64, G(128, 128, 8, 8, 5), _FP8["dn"]),
        "down 6 stages": MoEConfig(64, _FP8["gu"], G(128, 128, 8, 4, 6)),
    },
    # Mixtral bf16 M=256 and 384 (the M=512 entry served both before session 12): block_m 64 tiles with short
    # tiles.
    **{f"mixtral:bf16:{m}": {"M=128 entry (block_m 64)": _MIX128,
                             "M=128 entry, short_m 16": with_short_m(_MIX128, 16),
                             "M=128 entry, short_m 32": with_short_m(_MIX128, 32),
                             "M=2048 tiles, short_m 32": _MIX2048_SHORT} for m in (256, 384)},
    "mixtral:bf16:512": {"M=2048 tiles, short_m 32": _MIX2048_SHORT},
}


def _also_time(shape_key: str, dtype: str, ms: tuple[int, ...], variants: dict[str, MoEConfig]) -> None:
    """Add variants to EXTRA for the cases shape_key:dtype:m, m in ms (merged with what they already have)."""
    for m in ms:
        EXTRA.setdefault(f"{shape_key}:{dtype}:{m}", {}).update(variants)


# Session 12. Mixtral bf16 M=192-512: the M=512 entry's tiles at block_m 64 (one 64-row block per expert at
# M=256), then narrower or deeper pipelines in the same shared memory (the 64-wide, 6-stage gate/up became the
# M=256 entry), then the M=512 tiles by TMA (the M=512 entry since).
_MIX512_BM64 = MoEConfig(64, G(128, 64, 16, 8, 4), G(128, 64, 8, 8, 4))
_also_time("mixtral", "bf16", (256, 384, 512), {
    "M=512 tiles at block_m 64": _MIX512_BM64,
    "M=512 tiles at block_m 64, short_m 16": with_short_m(_MIX512_BM64, 16),
    "block_m 64, gate/up 5 stages": MoEConfig(64, G(128, 64, 16, 8, 5), G(128, 64, 8, 8, 4)),
    "block_m 64, 64x128 gate/up": MoEConfig(64, G(64, 128, 16, 8, 4), G(128, 64, 8, 8, 4)),
})
# The Mixtral bf16 M=512 entry with pointer loads (its tiles by TMA in sessions 12-14; the M=288 entry), and by
# TMA.
_MIX512 = MoEConfig(128, G(128, 64, 16, 8, 4, short_m=32), G(128, 64, 8, 8, 5, short_m=32))
_MIX512_TMA = MoEConfig(128, G(128, 64, 16, 8, 4, "tma", short_m=32), G(128, 64, 8, 8, 5, "tma", short_m=32))
_also_time("mixtral", "bf16", (256, 384), {  # 32-deep k steps, twice the stages in the same shared memory
    "gate/up k32 8 stages": MoEConfig(128, G(128, 32, 16, 8, 8, short_m=32), _MIX512.down),
    "down k32 8 stages": MoEConfig(128, _MIX512.gate_up, G(128, 32, 8, 8, 8, short_m=32)),
    "both k32 8 stages": MoEConfig(128, G(128, 32, 16, 8, 8, short_m=32), G(128, 32, 8, 8, 8, short_m=32)),
})
_also_time("mixtral", "bf16", (192, 224, 256, 288, 320, 384, 512), {
    "M=128 entry (block_m 64)": _MIX128,
    "M=256 entry (gate/up 64 wide, 6 stages)": SHAPES["mixtral"].table_config(256, False),
    "M=512 entry before (tiles by TMA)": _MIX512_TMA,
    "M=512 entry, pointer loads": _MIX512,
    "gate/up 64 wide, 6 stages, group_m 8": MoEConfig(128, G(64, 64, 8, 8, 6, short_m=32), _MIX512.down),
    "gate/up 64 wide, 4 warps, 6 stages": MoEConfig(128, G(64, 64, 16, 4, 6, short_m=32), _MIX512.down),
    "down 6 stages": MoEConfig(128, _MIX512.gate_up, G(128, 64, 8, 8, 6, short_m=32)),
    "down 256 wide, 4 stages": MoEConfig(128, _MIX512.gate_up, G(256, 64, 8, 8, 4, short_m=32)),
})
_also_time("mixtral", "bf16", (256, 384, 512), {
    "M=512 tiles by TMA, gate/up warp-specialised": MoEConfig(
        128, G(128, 64, 16, 8, 4, "tma", True, 32), G(128, 64, 8, 8, 5, "tma", short_m=32)),
    "M=512 tiles by TMA, both warp-specialised": MoEConfig(
        128, G(128, 64, 16, 8, 4, "tma", True, 32), G(128, 64, 8, 8, 5, "tma", True, 32)),
    "M=512 tiles, down by TMA": MoEConfig(128, _MIX512.gate_up, G(128, 64, 8, 8, 5, "tma", short_m=32)),
})
# Qwen3 fp8: the M=384 entry (block_m 32, 4-warp gate/up) against the entries on either side, and its
# neighbours in tile space; at M=512, 64-deep k steps (two per scale group: more stages, or two programs per SM,
# in the same memory).
_also_time("qwen3", "fp8", (192, 224, 256, 320, 384, 448), {
    "M=128 entry": SHAPES["qwen3"].table_config(128, True),
    "M=384 entry": SHAPES["qwen3"].table_config(384, True),
    "M=512 entry": SHAPES["qwen3"].table_config(512, True),
    "block_m 32, 4-warp gate/up 4 stages": MoEConfig(32, G(128, 128, 8, 4, 4), _FP8["dn"]),
    "block_m 32, 4-warp gate/up 5 stages": MoEConfig(32, G(128, 128, 8, 4, 5), _FP8["dn"]),
    "block_m 32, 4-warp 4-stage gate/up, group_m 1": MoEConfig(32, G(128, 128, 1, 4, 4), G(128, 128, 1, 4, 4)),
    "block_m 32, 4-warp 4-stage gate/up, down 5 stages": MoEConfig(32, G(128, 128, 8, 4, 4), G(128, 128, 8, 4, 5)),
})
_also_time("qwen3", "fp8", (512,), {
    "gate/up k64 5 stages": MoEConfig(64, G(128, 64, 8, 8, 5), _FP8["dn"]),
    "gate/up k64 8 stages": MoEConfig(64, G(128, 64, 8, 8, 8), _FP8["dn"]),
    "down k64 8 stages": MoEConfig(64, _FP8["gu"], G(128, 64, 8, 4, 8)),
    "both k64, 5 and 8 stages": MoEConfig(64, G(128, 64, 8, 8, 5), G(128, 64, 8, 4, 8)),
})
# Mixtral fp8 M=256-512 (0.76 at 256 in session 11): short tiles on the entries either side, block_m 128 with
# short_m 32 (tiles of 32, 64 or 128 rows; one block per expert), the Qwen3 M=384 entry's tiles; then the M=512
# entry's TMA loads varied: gate/up with 4, then 5 stages won (the entry since session 12); then its neighbours,
# and 64-deep k steps.
# _MIX8 is the M=512 entry of sessions 12-23, the M=256 entry since session 24 (the M=384-2048 entries then went to
# the Gluon kernel); _MIX8_2048 the M=2048 entry of those sessions.
_MIX8, _MIX8_128 = (SHAPES["mixtral"].table_config(m, True) for m in (256, 128))
_MIX8_2048 = MoEConfig(128, G(64, 128, 8, 8, 4), G(128, 128, 8, 8, 3))
_also_time("mixtral", "fp8", (256, 384), {
    "M=128 entry": _MIX8_128,
    "M=128 entry, short_m 16": with_short_m(_MIX8_128, 16),
    "block_m 128, short_m 32": with_short_m(MoEConfig(128, G(128, 128, 8, 8, 3), G(128, 128, 8, 8, 3)), 32),
    "Qwen3 fp8 M=384 tiles": SHAPES["qwen3"].table_config(384, True),
})
_also_time("mixtral", "fp8", (256, 384, 512), {
    "gate/up 3 stages (before session 12)": MoEConfig(64, G(128, 128, 16, 8, 3, "tma"), _MIX8.down),
    "gate/up 4 stages": MoEConfig(64, G(128, 128, 16, 8, 4, "tma"), _MIX8.down),
    "gate/up rows gathered, 3 stages, warp-specialised": MoEConfig(
        64, G(128, 128, 16, 8, 3, "tma_gathered", True), _MIX8.down),
    "gate/up rows gathered, 5 stages, warp-specialised": MoEConfig(
        64, G(128, 128, 16, 8, 5, "tma_gathered", True), _MIX8.down),
    "gate/up pointer loads, 5 stages": MoEConfig(64, G(128, 128, 16, 8, 5), _MIX8.down),
    "gate/up group_m 8": MoEConfig(64, G(128, 128, 8, 8, 5, "tma"), _MIX8.down),
    "down not warp-specialised": MoEConfig(64, _MIX8.gate_up, G(128, 128, 8, 8, 4, "tma")),
    "down 3 stages": MoEConfig(64, _MIX8.gate_up, G(128, 128, 8, 8, 3, "tma", True)),
    "down 5 stages": MoEConfig(64, _MIX8.gate_up, G(128, 128, 8, 8, 5, "tma", True)),
    "sessions 12-23's M=512 entry, short_m 16": with_short_m(_MIX8, 16),
})
_also_time("mixtral", "fp8", (384, 512), {
    "M=2048 entry": _MIX8_2048,
    "M=2048 entry, short_m 32": with_short_m(_MIX8_2048, 32),
    "block_m 128 TMA, short_m 32": with_short_m(
        MoEConfig(128, G(128, 128, 8, 8, 3, "tma"), G(128, 128, 8, 8, 3, "tma", True)), 32),
    "gate/up k64 8 stages": MoEConfig(64, G(128, 64, 16, 8, 8, "tma"), _MIX8.down),
    "gate/up k64 10 stages": MoEConfig(64, G(128, 64, 16, 8, 10, "tma"), _MIX8.down),
})
# Session 13: the MMAs transposed (swap_ab: tokens on the tensor cores' N side) with 96-row tiles (mid_m), the
# Mixtral bf16 entries at M=240-443 since; timed against the entries they replaced and without the mid tiles.
_TRANSPOSED = dict(swap_ab=True, mid_m=True)
_also_time("mixtral", "bf16", (240, 256, 264, 272, 300, 320, 330, 352, 384, 416, 440, 448, 512), {
    "M=256 entry before (not transposed)": MoEConfig(128, G(64, 64, 16, 8, 6, short_m=32), _MIX512.down),
    "M=512 entry, pointer loads": _MIX512,  # the M=288 entry before
    "M=512 tiles, transposed, no mid tiles": MoEConfig(128, G(128, 64, 16, 8, 4, short_m=32, swap_ab=True),
                                                       G(128, 64, 8, 8, 5, short_m=32, swap_ab=True)),
    "M=512 tiles, transposed, mid tiles": MoEConfig(128, G(128, 64, 16, 8, 4, short_m=32, **_TRANSPOSED),
                                                    G(128, 64, 8, 8, 5, short_m=32, **_TRANSPOSED)),
})
# Session 14: transposed MMAs with fp8 (and in the pairs path). Each case's table entry against the same tiles
# not transposed ("untransposed"), which was the entry before wherever the session gave an entry swap_ab; at
# M=443-496 the M=384 entry transposed against the M=512 entry, which served M=448-496 before; at M=512 the
# tiles tried for the M=512 entry (kept: none won); then entries that stayed untransposed, timed transposed.
_TM = dict(swap_ab=True, mid_m=True)


def _other_orientation(key: str, dtype: str, ms: tuple[int, ...]) -> None:
    """Time each size's table entry against the same tiles in the other MMA orientation: "untransposed" where
    the entry takes swap_ab, "transposed" where it does not."""
    for m in ms:
        table = SHAPES[key].table_config(m, dtype == "fp8")
        _also_time(key, dtype, (m,), {"untransposed": with_swap_ab(table, False)} if table.gate_up.swap_ab
                   else {"transposed": with_swap_ab(table, True)})


_other_orientation("qwen3", "fp8", (1, 8, 32, 128, 192, 224, 320, 384, 443))
_other_orientation("deepseek", "fp8", (1, 8, 32, 128, 256, 512, 768, 1000))
_other_orientation("mixtral", "fp8", (1, 8, 32, 128))
_also_time("mixtral", "fp8", (256, 384, 512), {  # the M=512 entry loads by TMA: these tiles by pointer
    "block_m 128 transposed, 96-row tiles, 64 wide": MoEConfig(128, G(64, 128, 16, 8, 4, short_m=32, **_TM),
                                                               G(64, 128, 8, 8, 4, short_m=32, **_TM)),
    "block_m 64 transposed, 48-row tiles": MoEConfig(64, G(128, 128, 16, 8, 4, short_m=16, **_TM),
                                                     G(128, 128, 8, 8, 4, short_m=16, **_TM)),
})
_other_orientation("deepseek", "bf16", (1, 8, 512))
_other_orientation("mixtral", "bf16", (1, 8, 32, 128))
_other_orientation("qwen3", "bf16", (1, 8, 16, 256))
_Q8_384T, _Q8_512 = (SHAPES["qwen3"].table_config(m, True) for m in (384, 512))
_also_time("qwen3", "fp8", (443, 448, 480, 496, 512), {"M=384 entry": _Q8_384T, "M=512 entry": _Q8_512})
_also_time("qwen3", "fp8", (512,), {
    "M=384 entry, short_m 16": with_short_m(_Q8_384T, 16),
    "block_m 64, gate/up transposed, 48-row tiles": MoEConfig(64, G(128, 128, 8, 8, 4, short_m=16, **_TM), _FP8["dn"]),
    "block_m 64, both transposed, 48-row tiles": MoEConfig(64, G(128, 128, 8, 8, 4, short_m=16, **_TM),
                                                          G(128, 128, 8, 4, 4, short_m=16, **_TM)),
    "block_m 64, gate/up transposed, short_m 32": MoEConfig(64, G(128, 128, 8, 8, 4, short_m=32, swap_ab=True),
                                                            _FP8["dn"]),
})
# Session 15: tail tiles (tail_m: a full block runs its expert's last block of at most short_m rows as a second
# MMA tile, so that block does not stream the expert's weights again). Where experts get a little over a block
# multiple of pairs: Mixtral at M=512 (128 +- 11 per expert), Qwen3 at M=2048 (128 +- 11) and 8192 (512 +- 22),
# the DeepSeek rank at M=8192 (256 +- 16). A tile of 128 + 32 rows takes 160 accumulator registers per thread
# in a 128-wide gate/up (gate and up), 80 in a 64-wide one.
_T = dict(short_m=32, tail_m=True)
# The Mixtral bf16 M=384 entry of sessions 13-15: transposed 96-row tiles (block-major and overlap since session 16).
_MIX384 = MoEConfig(128, G(128, 64, 16, 8, 4, short_m=32, **_TM), G(128, 64, 8, 8, 5, short_m=32, **_TM))
_MIX512_T = with_tail_m(_MIX384)  # the M=512 entry as first adopted (gate/up group_m 16)
_also_time("mixtral", "bf16", (448, 480, 512, 544, 576, 608, 640, 672, 704, 724), {
    "M=512 entry before (tiles by TMA)": _MIX512_TMA,
    "M=512 entry, pointer loads": _MIX512,
    "M=512 entry, pointer loads, tail tiles": with_tail_m(_MIX512),
    "gate/up 64 wide 6 stages, tail tiles": MoEConfig(128, G(64, 64, 16, 8, 6, **_T), G(128, 64, 8, 8, 5, **_T)),
    "transposed, mid tiles (M=384 entry)": _MIX384,
    "transposed, mid + tail tiles": _MIX512_T,
    "transposed, mid + tail tiles, gate/up 64 wide 6 stages": MoEConfig(
        128, G(64, 64, 16, 8, 6, **_T, **_TM), G(128, 64, 8, 8, 5, **_T, **_TM)),
})
_also_time("mixtral", "bf16", (576, 608, 624, 640, 672, 704, 724, 768, 810), {
    "M=512 entry before (tiles by TMA)": _MIX512_TMA,
    "transposed, mid + tail tiles": _MIX512_T,
    "M=1024 entry": SHAPES["mixtral"].table_config(1024, False),
})
_MIX8_PTR = MoEConfig(64, G(128, 128, 16, 8, 5, short_m=32), G(128, 128, 8, 8, 4, short_m=32))
_also_time("mixtral", "fp8", (384, 448, 512, 576), {
    "M=512 entry, pointer loads, short_m 32": _MIX8_PTR,
    "M=512 entry, pointer loads, short_m 32, tail tiles": with_tail_m(_MIX8_PTR),
    "block_m 128, gate/up 64 wide, tail tiles": MoEConfig(128, G(64, 128, 8, 8, 4, **_T), G(128, 128, 8, 8, 3, **_T)),
})
_Q2048 = replace(SHAPES["qwen3"].table_config(2048, False), overlap=False)  # its tiles; overlap since session 16
_BM128_PTR = MoEConfig(128, G(64, 64, 8, 8, 6, short_m=32), G(128, 64, 8, 8, 5, short_m=32))
_also_time("qwen3", "bf16", (2048,), {
    "tail tiles": with_tail_m(_Q2048),
    "gate/up 64 wide 6 stages, down 128 wide 5 stages": _BM128_PTR,
    "gate/up 64 wide 6 stages, down 128 wide 5 stages, tail tiles": with_tail_m(_BM128_PTR),
})
for _key in ("qwen3", "deepseek"):
    _also_time(_key, "bf16", (8192,), {
        "pointer loads": with_tiles(_Q2048, dict(loads="ptr"), dict(loads="ptr")),  # Qwen3 M=2048's tiles
        "gate/up 64 wide 6 stages, down 128 wide 5 stages": _BM128_PTR,
        "gate/up 64 wide 6 stages, down 128 wide 5 stages, tail tiles": with_tail_m(_BM128_PTR),
    })
# The tail-tile entry's neighbours in tile space.
_also_time("mixtral", "bf16", (448, 512, 576), {
    "tail entry, gate/up group_m 8": with_tiles(_MIX512_T, gate_up=dict(group_m=8)),
    "tail entry, gate/up 3 stages": with_tiles(_MIX512_T, gate_up=dict(num_stages=3)),
    "tail entry, gate/up k32 8 stages": with_tiles(_MIX512_T, gate_up=dict(block_k=32, num_stages=8)),
    "tail entry, down 4 stages": with_tiles(_MIX512_T, down=dict(num_stages=4)),
    "tail entry, down group_m 16": with_tiles(_MIX512_T, down=dict(group_m=16)),
    "tail entry, down k32 8 stages": with_tiles(_MIX512_T, down=dict(block_k=32, num_stages=8)),
})
# A 256-wide transposed down: 128 programs (one wave of the 132 multiprocessors) instead of 256 (1.94 waves).
for _name, _entry, _ms in (("M=384", _MIX384, (256, 320, 384, 416, 448)),
                           ("M=512", with_tiles(_MIX512_T, gate_up=dict(group_m=8)), (448, 512, 576))):
    _also_time("mixtral", "bf16", _ms, {f"{_name} entry, down 256 wide {st} stages":
                                        with_tiles(_entry, down=dict(block_n=256, num_stages=st)) for st in (3, 4)})
# Qwen3 at M=384-1024: 24-64 pairs per expert, so block_m 32 entries give many experts a second, short block;
# with tail tiles (short_m 16) an expert of up to 48 pairs streams its weights once.
_Q8_TAIL = with_tail_m(with_short_m(_Q8_384T, 16))
_also_time("qwen3", "fp8", (448, 512, 576, 640, 724, 800, 1024), {
    "M=384 entry": _Q8_384T,
    "M=512 entry": _Q8_512,
    "M=384 entry, short_m 16, tail tiles": _Q8_TAIL,
    "M=384 entry, short_m 16, tail tiles, gate/up 8 warps": with_tiles(_Q8_TAIL, gate_up=dict(num_warps=8)),
})
_BM32_TAIL = with_tail_m(with_short_m(_BM32, 16))
_also_time("qwen3", "bf16", (384, 448, 512, 576, 640, 724, 800), {
    "M=256 entry (block_m 32)": _BM32,
    "M=512 entry (block_m 64)": SHAPES["qwen3"].table_config(512, False),
    "block_m 32, short_m 16, tail tiles": _BM32_TAIL,
    "block_m 32, short_m 16, tail tiles, transposed": with_swap_ab(_BM32_TAIL, True),
})
# Session 16: down overlapping gate/up (MoEConfig.overlap: each down program waits only for its block's act), with
# gate/up in its entry's order and block-major (group_m 1, so blocks finish early); "gate/up group_m 1" alone
# separates the order's own effect. Entries loading by TMA are timed by pointer loads (Mixtral fp8 M=384-512: the
# pointer-load tiles of session 15). The session's "entry before" figures are the tables of 556ab30; entries that
# took overlap since are timed against "without overlap".
def _overlap_variants(cfg: MoEConfig, fp8: bool) -> dict[str, MoEConfig]:
    """cfg against itself with overlap on or off ("overlap" / "without overlap"), where overlap can apply
    (`overlap_applies`), with block-major orders, and those orders alone ("order only: ...")."""
    base = replace(cfg, overlap=False)
    out = {}
    if overlap_applies(with_overlap(base), fp8):
        out.update({"without overlap": base} if cfg.overlap else {"overlap": with_overlap(base)})
        if base.gate_up.group_m != 1:
            out["overlap, gate/up group_m 1"] = with_overlap(base, 1)
        if base.down.group_m != 1:
            out["overlap, both group_m 1"] = with_tiles(with_overlap(base, 1), down=dict(group_m=1))
    if base.gate_up.group_m != 1:
        out["order only: gate/up group_m 1"] = with_tiles(base, gate_up=dict(group_m=1))
    if base.down.group_m != 1:
        out["order only: both group_m 1"] = with_tiles(base, gate_up=dict(group_m=1), down=dict(group_m=1))
    return out


OVERLAP_CASES = ("mixtral:bf16:256,mixtral:bf16:288,mixtral:bf16:320,mixtral:bf16:384,mixtral:bf16:448,"
                 "mixtral:bf16:512,mixtral:bf16:576,mixtral:bf16:608,mixtral:bf16:640,"
                 "mixtral:bf16:32,mixtral:bf16:128,qwen3:bf16:32,qwen3:bf16:128,qwen3:bf16:256,"
                 "qwen3:bf16:512,qwen3:bf16:2048,qwen3:fp8:128,qwen3:fp8:384,qwen3:fp8:512,deepseek:bf16:512,"
                 "deepseek:bf16:2048,deepseek:fp8:512,deepseek:fp8:2048,deepseek:bf16:32,deepseek:bf16:128,"
                 "qwen3:fp8:32,mixtral:fp8:128,mixtral:fp8:256,mixtral:fp8:384,mixtral:fp8:512")
CASE_SETS["overlap"] = OVERLAP_CASES
for _case in OVERLAP_CASES.split(","):
    _key, _dtype, _m = _case.split(":")
    _entry = SHAPES[_key].table_config(int(_m), _dtype == "fp8")
    if _entry.pairs:
        continue
    if _entry.gate_up.loads != "ptr" or _entry.down.loads != "ptr":
        _also_time(_key, _dtype, (int(_m),), {"pointer loads": _MIX8_PTR, **{
            f"pointer loads, {label}": v for label, v in _overlap_variants(_MIX8_PTR, _dtype == "fp8").items()}})
    else:
        _also_time(_key, _dtype, (int(_m),), _overlap_variants(_entry, _dtype == "fp8"))
# Session 16: untransposed fp8 short tiles (16 or 32 rows, which Triton 3.6 runs as fp16 mma.sync after converting
# the fp8 operands) gave results that differ run to run on the H100; the Qwen3 fp8 M=2048 entry had them.
_Q8_2048 = MoEConfig(64, G(128, 128, 8, 8, 3, short_m=16), G(128, 128, 8, 8, 3, short_m=16))  # the entry before
_also_time("qwen3", "fp8", (1024, 1536, 2048, 3072, 4096), {
    "entry before (untransposed short tiles)": _Q8_2048, "transposed": with_swap_ab(_Q8_2048, True),
    "no short tiles": with_short_m(_Q8_2048, 0),
    "transposed, overlap": with_overlap(with_swap_ab(_Q8_2048, True)),
    "no short tiles, overlap": with_overlap(with_short_m(_Q8_2048, 0)),
    "no short tiles, overlap, both group_m 1": with_tiles(with_overlap(with_short_m(_Q8_2048, 0), 1),
                                                          down=dict(group_m=1)),
})
# Session 16: the Qwen3 fp8 M=512 entry's neighbours with overlap (the entry is 0.3-0.7% short of its target).
_Q8_512_OV = with_overlap(MoEConfig(64, _FP8["gu"], _FP8["dn"]))
_also_time("qwen3", "fp8", (496, 512, 640, 800, 1000), {"entry before (gate/up 4 stages)": _Q8_512_OV})
_also_time("qwen3", "fp8", (448, 512), {
    "overlap, gate/up 5 stages": with_tiles(_Q8_512_OV, gate_up=dict(num_stages=5)),
    "overlap, down 8 warps": with_tiles(_Q8_512_OV, down=dict(num_warps=8)),
    "overlap, down 6 stages": with_tiles(_Q8_512_OV, down=dict(num_stages=6)),
    "overlap, M=384 entry": with_overlap(_Q8_384T),
    "overlap, M=384 entry, short_m 16": with_overlap(with_short_m(_Q8_384T, 16)),
})
# Session 17: a decode batch of 2 tokens took the M=1 entries (M=3-4 the M=8 entry), tuned for one token; the
# one-launch pairs path measured there (RESULTS, session 17) hinted at tiles left on the table.
for _key in ("qwen3", "deepseek", "mixtral"):
    _m1, _m8 = SHAPES[_key].table_config(1, False), SHAPES[_key].table_config(8, False)
    _also_time(_key, "bf16", (1, 2, 3), {"M=1 entry": _m1, "M=8 entry": _m8,
                                         "M=1 entry, gate/up 32 wide": with_tiles(_m1, gate_up=dict(block_n=32)),
                                         "M=1 entry, down 64 wide": with_tiles(_m1, down=dict(block_n=64))})
# Session 17: the pairs path in one launch (MoEConfig.pairs = "one": down's programs after gate/up's in the same
# launch, pair-major, each waiting only until its pair's act is whole) against the entries' two launches, with
# gate/up's stages (the launch's) and deeper, built from the current entries (the Mixtral bf16 M=1 entry took one
# launch since); calls 1 and 4 also timed an N-tile-major order, dropped since (RESULTS, session 17). Mixtral fp8
# M=1 (aligned) against the pairs path with 128-wide gate/up tiles (act quantised in gate/up's epilogue, which one
# launch needs), in two launches and one.
def _one_launch_variants(cfg: MoEConfig) -> dict[str, MoEConfig]:
    """cfg's tiles in one launch (with gate/up's warps and stages in both GEMMs, as one launch has them) and
    deeper, and in two launches with a 6-stage gate/up."""

    def one(stages: int, **gate_up) -> MoEConfig:
        depth = dict(num_warps=cfg.gate_up.num_warps, num_stages=stages)
        return replace(with_tiles(replace(cfg, pairs="pair"), gate_up=dict(depth, **gate_up), down=depth),
                       pairs="one")

    gu_stages = cfg.gate_up.num_stages
    return {"one launch": one(gu_stages), "one launch, 6 stages": one(6), "one launch, 8 stages": one(8),
            "one launch, 6 stages, down 128 wide": with_tiles(one(6), down=dict(block_n=128)),
            "one launch, 6 stages, gate/up 64 wide": one(6, block_n=64),
            "two launches, gate/up 6 stages": with_tiles(replace(cfg, pairs="pair"), gate_up=dict(num_stages=6))}


ONE_LAUNCH_CASES = "qwen3:bf16:1,qwen3:bf16:2,qwen3:bf16:8,qwen3:bf16:16,deepseek:bf16:1,mixtral:bf16:1,mixtral:bf16:2"
CASE_SETS["one"] = ONE_LAUNCH_CASES
for _case in ONE_LAUNCH_CASES.split(","):
    _key, _dtype, _m = _case.split(":")
    _also_time(_key, _dtype, (int(_m),), _one_launch_variants(SHAPES[_key].table_config(int(_m), False)))
_MIX8_FP8_M1 = SHAPES["mixtral"].table_config(1, True)
_MIX8_FP8_PAIRS = replace(with_tiles(_MIX8_FP8_M1, gate_up=dict(block_n=128)), pairs="pair")
_also_time("mixtral", "fp8", (1,), {"pairs, gate/up 128 wide": _MIX8_FP8_PAIRS,
                                    **{f"pairs, gate/up 128 wide, {label}": v
                                       for label, v in _one_launch_variants(_MIX8_FP8_PAIRS).items()
                                       if "64 wide" not in label and "8 stages" not in label}})
# The Mixtral bf16 M=1 entry before it took one launch (session 17), at the sizes it serves.
_also_time("mixtral", "bf16", (1, 2), {"entry before (two launches)": MoEConfig(
    16, G(32, 128, 1, 4, 4, swap_ab=True), G(64, 128, 1, 4, 4, swap_ab=True), pairs="pair")})
REPEATS = 3
_counters = align_mod.completion_counters


def _fresh_zeros(device: torch.device, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.int32, device=device)


def parse_cases(spec: str, prog: str = "moe_entries_probe") -> list[tuple[str, str, int]]:
    """--cases: a name of CASE_SETS or a comma list of shape key:dtype:M -> [(shape key, dtype, M)]; prog names
    the script in the error."""
    spec = CASE_SETS.get(spec, spec)
    cases = [c.split(":") for c in spec.split(",")]
    bad = [":".join(c) for c in cases if len(c) != 3 or c[0] not in SHAPES or c[1] not in ("bf16", "fp8")
           or not c[2].isdigit()]
    if bad:
        raise SystemExit(f"{prog}: bad case(s) {bad}; a case is key:dtype:M with key one of "
                         f"{sorted(SHAPES)} and dtype bf16 or fp8, or --cases {' or '.join(CASE_SETS)}")
    return [(k, d, int(m)) for k, d, m in cases]


def expected_rows(s: MoEShape, m: int) -> int:
    """Rows an all-to-all delivers to a rank holding s.num_experts of s.global_experts for m tokens routed
    top-k uniformly: the tokens with at least one choice here."""
    none_here = math.comb(s.global_experts - s.num_experts, s.top_k) / math.comb(s.global_experts, s.top_k)
    return max(1, round(m * (1 - none_here)))


def _variants(shape_key: str, dtype: str, m: int, memset: bool, short: bool) -> dict[str, tuple[MoEConfig, bool]]:
    """label -> (config, align scratch zeroed by a memset launch) for a case: its table entry, EXTRA's configs,
    with short, the entry with its other short-tile choices ("short_m 0" = none; `short_candidates`), and, for
    a rank holding a share of the experts of a model with an unsharded table: "heuristic" (the `default_config`
    pick for the local count) and, once the rank has a table of its own, "unsharded table" (the global count's
    entry, which `get_config` takes where the local table is missing)."""
    s, fp8 = SHAPES[shape_key], dtype == "fp8"
    configs = {"table": s.table_config(m, fp8), **EXTRA.get(f"{shape_key}:{dtype}:{m}", {})}
    if short:
        configs.update({f"short_m {c.gate_up.short_m}": c for c in short_candidates(configs["table"])})
    if s.rows == "all_to_all":
        configs["keyed on rows"] = s.table_config(expected_rows(s, m), fp8)
    if s.num_experts != s.global_experts and load_table(table_name(s.global_experts, s.hidden, s.inter, fp8)):
        configs["heuristic"] = default_config(m, s.num_experts, s.hidden, s.inter, s.top_k, fp8)
        if load_table(table_name(s.num_experts, s.hidden, s.inter, fp8)):
            configs["unsharded table"] = get_config(m, s.global_experts, s.hidden, s.inter, s.top_k, fp8)
    out = {}
    for label, cfg in configs.items():
        out[label] = (cfg, False)
        if memset:
            out[f"{label}, memset"] = (cfg, True)
    return out


def build_plan(cases: list[tuple[str, str, int]], memset: bool, short: bool = False,
               only: str | None = None) -> dict[tuple[str, str, int], dict]:
    """(shape key, dtype, M) -> `_variants`, with only: just the table entry and the variants whose label
    matches the regular expression only; no GPU needed."""
    plan = {(key, dtype, m): _variants(key, dtype, m, memset, short) for key, dtype, m in cases}
    if only is not None:
        plan = {case: {label: v for label, v in variants.items() if label.startswith("table") or re.search(only, label)}
                for case, variants in plan.items()}
    return plan


def _time_case(key: str, dtype: str, m: int, variants: dict[str, tuple[MoEConfig, bool]],
               ceilings: dict) -> tuple[dict, list[str]]:
    """(row for the JSON, "case label" of each variant that failed) for one case and its `_variants`."""
    name = f"{key}:{dtype}:{m}"
    shape, fp8 = SHAPES[key], dtype == "fp8"
    w = make_weights(shape, fp8)
    inputs = rotating_inputs(shape, m, fp8)
    roof = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"],
                       ceilings["fp8_tflops"] if fp8 else ceilings["bf16_tflops"])

    def swap_counters(label: str) -> None:  # the align's scratch: zeroed by a memset launch, or the counters
        align_mod.completion_counters = _fresh_zeros if variants[label][1] else _counters

    bad: list[str] = []
    try:
        runs = alternate_us(w, inputs, {label: cfg for label, (cfg, _) in variants.items()}, REPEATS,
                            before=swap_counters, failed=bad)
    finally:
        align_mod.completion_counters = _counters
    runs = {label: [round(us, 2) for us in v] for label, v in runs.items()}
    row = dict(roofline_us=roof, variants={})
    for label, (cfg, zeroed) in variants.items():
        med = statistics.median(runs[label])
        row["variants"][label] = dict(config=cfg.to_dict(), memset=zeroed, runs=runs[label], median_us=med)
        print(f"| {name} | {label} | {med:.1f} | {runs[label]} | {roof / med:.3f} |", flush=True)
    del w
    torch.cuda.empty_cache()
    return row, [f"{name} {label}" for label in bad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="default",
                        help="default (CASES), ep (EP_CASES), ep-a2a (EP_A2A_CASES), short (SHORT_CASES), overlap "
                             "(OVERLAP_CASES) or a comma list of shape key:dtype:M")
    parser.add_argument("--memset", action="store_true", help="also time each variant with the memset align")
    parser.add_argument("--short", action="store_true", help="also time each table entry with short tiles")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="time only the variants whose label matches REGEX (search), besides the table entry")
    parser.add_argument("--out", default="benchmarks/out/moe_entries.json")
    args = parser.parse_args()
    plan = build_plan(parse_cases(args.cases), args.memset, args.short, args.only)
    t0 = time.time()
    # A memset variant runs its config's kernels: whole_jobs keeps one job per compiled kernel.
    errors = precompile(whole_jobs((key, dtype == "fp8", cfg)
                                   for (key, dtype, _), variants in plan.items() for cfg, _ in variants.values()))
    print(f"compiled in {time.time() - t0:.0f} s; failures: {errors}", flush=True)
    ceilings = measure_ceilings()
    bundle = dict(device=torch.cuda.get_device_name(), ceilings=ceilings, compile_failures=errors, cases={})
    print(f"ceilings: {ceilings}")
    print("| case | variant | µs (median) | runs | frac |")
    print("|---|---|---:|---|---:|")
    failed = list(errors)
    for (key, dtype, m), variants in plan.items():
        bundle["cases"][f"{key}:{dtype}:{m}"], bad = _time_case(key, dtype, m, variants, ceilings)
        failed += bad
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(bundle, f, indent=1)
    if failed:
        raise SystemExit(f"moe_entries_probe: {len(failed)} variant(s) failed: {failed}")


if __name__ == "__main__":
    main()
