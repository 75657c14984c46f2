"""Block sizes for `fused_moe`: tuned tables stored as JSON data, with a shape-based fallback.

A table lives in kernels/configs/E{E}_H{H}_I{I}_{bf16|fp8}.json and maps M (tokens in the call) to one
`MoEConfig`; a call takes the entry whose M is nearest on a log scale. Tables are written by
`python benchmarks/kernels.py --tune` on the target GPU. An expert-parallel rank without a table for its
local expert count borrows the unsharded model's table (`get_config`'s global_experts).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
_NUM_SMS = 132  # H100 SXM; only steers the fallback heuristic
# Pipeline buffers a tile may take: the H100's 227 KB of shared memory per block less 11 KB for Triton's
# barriers and epilogue scratch. Every tuned (bf16/fp8) entry fits; fp32 tiles of the same shape may not. For the
# aligned kernels Triton 3.6 reports what this counts (the Mixtral bf16 M=512 tail entry: 208 KB; a 216 KB
# variant ran on the H100 too, benchmarks/RESULTS.md session 15); 200 KB was the budget before.
SMEM_BUDGET = 216 * 1024
PAIRS_MODES = ("", "pair", "one")
LOADS = ("ptr", "tma", "tma_gathered", "gluon")


@dataclass(slots=True, frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM: BLOCK_N x BLOCK_K per k step, GROUP_M blocks sharing a weight tile.

    loads (aligned path only; `moeserve.kernels.fused_moe_tma`): "ptr" = every tile by pointer loads; "tma" = weight
    tiles (and down's activation tiles) by TMA, gate/up's token rows by pointer gather; "tma_gathered" = as "tma",
    with gate/up's token rows first copied into slot order so they come by TMA too; "gluon" = the persistent
    warp-specialised Gluon kernel (`moeserve.kernels.moe_gemm_gluon`: 128-row blocks, 16-bit weights or fp8 ones in
    128 x 128 tiles, Hopper with Triton 3.6), gate/up's token rows first copied into slot order as with
    "tma_gathered"; where it cannot run (`moe_gemm_gluon.gluon_gemm_unsupported`) the GEMM runs as "tma" (or by
    pointers, where TMA cannot either).
    warp_specialize: with TMA loads, let Triton split the k loop into producer and consumer warps.
    short_m (aligned path only): the smallest of the tile heights a block may run, block_m / 2 or block_m / 4
    (at least 16 rows), or 0 = every block runs block_m rows. A block runs the smallest of short_m,
    2 * short_m (below block_m) and block_m that holds its valid rows, so an expert's last, mostly padding
    block costs a fraction of the MMA work. The kernel is built with each height and picks one per block at
    run time (`moe_tiles.each_block`), so the height a token's rows take depends on how many other tokens
    chose the same expert (as the table entry already depends on the batch's size); results are identical run
    to run. With tail_m (below) a short last block runs no tile of its own: its expert's previous block takes it.
    swap_ab (pointer loads; bf16 or fp8, aligned or pairs path): the MMAs run transposed, weight rows on the
    tensor cores' M side (64-row granularity) and the block's tokens on the N side (8-row granularity), so a
    tile of fewer than 64 rows costs its own rows of MMA rather than 64; with fp8, each k step's block scales
    then apply to that many rows too. It takes Hopper's wgmma only where block_n >= 64 (the weight rows fill
    its M side); narrower tiles run mma.sync either way. Which entries gain is measured, not assumed
    (benchmarks/RESULTS.md, sessions 13 and 14): fp8 tiles of up to 32 rows did (untransposed, Triton 3.6
    runs those as fp16 mma.sync after converting the fp8 operands; transposed they take fp8 wgmma), Mixtral
    fp8's 64- and 128-row tiles lost. Untransposed fp8 short tiles (short_m with fp8 weights, swap_ab off) gave
    results that differ run to run on the H100 under Triton 3.6 (a few ulps in 1-4% of the outputs; whole
    16- and 32-row blocks, and bf16 short tiles, did not): no fp8 table entry takes them (a test checks), and
    a config that asks for them is not deterministic on that GPU.
    mid_m (with swap_ab and short_m = block_m / 4): also a tile of 3 * short_m rows, for blocks that fill more
    than half and at most three quarters of block_m. It runs as two MMA tiles (block_m / 2 and short_m rows)
    that share each weight tile: a quarter less MMA work than block_m rows. On the H100 Mixtral's 128-row tiles
    cost about the MMA height, not the valid rows (benchmarks/RESULTS.md, session 13).
    tail_m (pointer loads, with short_m): a full block whose expert's next block holds at most short_m rows (the
    expert's last, mostly padding block) also runs that block's rows, as a second MMA tile of short_m rows
    sharing each weight tile; the tail block's own program then does nothing. Without it the tail block streams
    its expert's weights through a multiprocessor a second time for a few rows: where experts get a little
    more than block_m pairs (Mixtral at M = 512: 128 +- 11) about half of them do.
    dynamic_tiles (loads "gluon"): the persistent kernel's programs draw their tiles from a counter, in grouped
    order, rather than each taking every num_programs-th tile. Where experts get a full block and a short one
    (Mixtral fp8 at M = 640: 128 + 32 rows), striding can give some programs only full tiles and others only
    short ones: drawing took 22% less there, 3% less at M = 800, and 2-5% more at M = 384, 512 and 2048
    (benchmarks/RESULTS.md, session 26)."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 4
    loads: str = "ptr"
    warp_specialize: bool = False
    short_m: int = 0
    mid_m: bool = False
    swap_ab: bool = False
    tail_m: bool = False
    dynamic_tiles: bool = False


@dataclass(slots=True, frozen=True)
class MoEConfig:
    """block_m is shared by the token layout (moe_align) and both GEMMs.

    pairs: small-M path with no align and no top-k-sum launch (2 launches or 1 instead of 4): gate/up runs one
    program per (pair, N tile), reading the expert straight from topk_ids; then "pair": down runs one program
    per (pair, N tile) and the last of a token's k programs on a tile sums their rows in a fixed order.
    "one": the same programs in one launch, pair-major, down's after gate/up's, each down program waiting only
    until its pair's act is whole, so down's programs fill multiprocessors that gate/up's last ones leave idle.
    One launch has one warp count and pipeline depth: gate/up's and down's must be equal. With fp8 weights it
    needs gate/up's epilogue to quantise act; otherwise the call runs "pair".
    "" = aligned path. Weights of an expert chosen by several tokens are read once per pair, so it only
    pays while M*k is small. block_m is then the MMA row count only (one row is real).

    fuse_act_quant (fp8 weights): gate/up's epilogue quantises act where its N tiles cover whole 128-channel
    groups (`moe_tiles.act_quant_fusable`); False sends act through the separate quantisation launch, which
    gives the same bits (for A/B timing, and the route tests compare the epilogue with).

    overlap (aligned path, pointer loads in both GEMMs): down does not wait for the whole gate/up launch to
    end. Each gate/up program counts its block's N tile as written, and a down program starts on its block
    as soon as every N tile of the act it reads is (that block's, and the next one's for a tail tile;
    `moe_tiles.wait_ready`). With programmatic dependent
    launch, down's programs then fill the multiprocessors that gate/up's last, partial wave leaves idle, where
    their blocks are done; gate/up's group_m 1 (block-major order) finishes blocks early. No effect where fp8
    act takes its own quantisation launch (`fuse_act_quant` off or N tiles not whole 128-channel groups)."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    pairs: str = ""
    fuse_act_quant: bool = True
    overlap: bool = False

    def __post_init__(self) -> None:
        for name, g in (("gate_up", self.gate_up), ("down", self.down)):
            for field, value in (("block_n", g.block_n), ("block_k", g.block_k)):
                if value < 16 or value & (value - 1):
                    raise ValueError(f"{name}.{field} must be a power of two >= 16, got {value}")
            if g.loads not in LOADS or (g.warp_specialize and g.loads == "ptr"):
                raise ValueError(f"{name}.loads must be one of {LOADS} (warp_specialize needs TMA), got "
                                 f"{g.loads!r} with warp_specialize={g.warp_specialize}")
        if self.pairs and (self.gate_up.loads != "ptr" or self.down.loads != "ptr"):
            raise ValueError("the pairs path loads by pointer only (loads='ptr')")
        if self.overlap and (self.pairs or self.gate_up.loads != "ptr" or self.down.loads != "ptr"):
            raise ValueError(f"overlap needs the aligned path with pointer loads in both GEMMs; got pairs="
                             f"{self.pairs!r}, loads {self.gate_up.loads!r} / {self.down.loads!r}")
        if self.pairs not in PAIRS_MODES:
            raise ValueError(f"pairs must be one of {PAIRS_MODES}, got {self.pairs!r}")
        one = (self.gate_up.num_warps, self.gate_up.num_stages), (self.down.num_warps, self.down.num_stages)
        if self.pairs == "one" and one[0] != one[1]:
            raise ValueError(f"pairs='one' runs both GEMMs in one launch: down's (num_warps, num_stages) {one[1]} "
                             f"must equal gate/up's {one[0]}")
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {self.block_m}")
        allowed = short_heights(self.block_m) if not self.pairs else ()
        for name, g in (("gate_up", self.gate_up), ("down", self.down)):
            if g.short_m and (type(g.short_m) is not int or g.short_m not in allowed):
                where = "the pairs path takes none" if self.pairs else (
                    f"block_m {self.block_m} takes {list(allowed)} (block_m / 2 or / 4, at least 16 rows)"
                    if allowed else f"block_m {self.block_m} takes none")
                raise ValueError(f"{name}.short_m must be 0 or a short tile height: {where}; got {g.short_m!r}")
            if g.swap_ab and g.loads != "ptr":
                raise ValueError(f"{name}.swap_ab needs pointer loads; got loads={g.loads!r}")
            if g.mid_m and (not g.swap_ab or g.short_m * 4 != self.block_m):
                raise ValueError(f"{name}.mid_m needs swap_ab and short_m = block_m / 4 (block_m >= 64); got "
                                 f"block_m={self.block_m}, swap_ab={g.swap_ab}, short_m={g.short_m}")
            if g.dynamic_tiles and g.loads != "gluon":
                raise ValueError(f"{name}.dynamic_tiles is for the persistent Gluon kernel (loads='gluon'); got "
                                 f"loads={g.loads!r}")
            if g.tail_m and (not g.short_m or g.loads != "ptr"):
                raise ValueError(f"{name}.tail_m needs short_m (the tail tile's height) and pointer loads; got "
                                 f"short_m={g.short_m}, loads={g.loads!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> MoEConfig:
        # Tables written before a field existed lack it: its default.
        return MoEConfig(d["block_m"], GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]),
                         d.get("pairs", ""), d.get("fuse_act_quant", True), d.get("overlap", False))


def short_heights(block_m: int) -> tuple[int, ...]:
    """The values `GemmConfig.short_m` may take besides 0 at this block_m: block_m / 2 and block_m / 4, each of
    at least 16 rows (the smallest MMA tile the kernels build)."""
    return tuple(h for h in (block_m // 2, block_m // 4) if h >= 16)


def table_name(num_experts: int, hidden: int, inter: int, fp8: bool) -> str:
    return f"E{num_experts}_H{hidden}_I{inter}_{'fp8' if fp8 else 'bf16'}.json"


def _table_body(name: str) -> dict:
    """The JSON of CONFIG_DIR/name ({"note": ..., "configs": {M: config}}), empty when there is no such table."""
    path = CONFIG_DIR / name
    return json.loads(path.read_text()) if path.exists() else {}


@functools.lru_cache(maxsize=64)
def load_table(name: str) -> dict[int, MoEConfig]:
    """{M: config} from CONFIG_DIR/name, empty when there is no such table."""
    return {int(m): MoEConfig.from_dict(c) for m, c in _table_body(name).get("configs", {}).items()}


def table_note(name: str) -> str:
    """The note of the table CONFIG_DIR/name: how and when it was tuned ("" when there is no such table)."""
    return _table_body(name).get("note", "")


def nearest(table: dict[int, MoEConfig], num_tokens: int) -> MoEConfig:
    """The entry whose M is nearest in log2 (ties: the larger M). Each entry therefore serves a range of M
    (with entries at 128, 256 and 512, the 256 entry serves M 182-362): when adding or changing one, time the
    sizes whose entry moves too. A table may repeat a neighbour's config under another M to narrow an entry's
    range (the Mixtral bf16 table's M=224 and M=288 entries keep its M=256 entry to M 240-271)."""
    return table[min(table, key=lambda m: (abs(math.log2(m) - math.log2(max(num_tokens, 1))), -m))]


def _pick_block_m(pairs_per_expert: float) -> int:
    for bm, limit in ((16, 16), (32, 32), (64, 96)):
        if pairs_per_expert <= limit:
            return bm
    return 128


def _narrow_n(blocks: float, n: int, widths: tuple[int, ...]) -> int:
    """Widest N tile that still gives two waves of CTAs on the weights (memory-bound case)."""
    for bn in widths:
        if blocks * math.ceil(n / bn) >= 2 * _NUM_SMS:
            return bn
    return widths[-1]


def default_config(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
                   fp8: bool) -> MoEConfig:
    """Heuristic used where no tuned table exists (uniform routing assumed)."""
    pairs = num_tokens * top_k
    pairs_per_expert = pairs / num_experts
    touched = num_experts * (1.0 - (1.0 - min(top_k / num_experts, 1.0)) ** num_tokens)
    bm = _pick_block_m(pairs_per_expert)
    blocks = touched * max(1.0, math.ceil(pairs_per_expert / bm))
    bk = 128 if (fp8 or bm <= 32) else 64
    if bm <= 32:
        gate_up = GemmConfig(_narrow_n(blocks, inter, (64, 32)), bk, 1, 4, 4)
        down = GemmConfig(_narrow_n(blocks, hidden, (128, 64, 32)), bk, 1, 4, 4 if bk == 128 else 5)
    elif bm == 64:
        gate_up = GemmConfig(64, bk, 8, 4, 4)
        down = GemmConfig(128, bk, 8, 4, 4)
    else:
        gate_up = GemmConfig(64 if not fp8 else 128, bk, 8, 8, 4 if not fp8 else 3)
        down = GemmConfig(128, bk, 8, 8, 4 if not fp8 else 3)
    if bm >= 64 and not fp8:
        # Tiles of block_m/4 and block_m/2 rows for experts' mostly-padding last blocks: in bf16 the best or
        # within 1% of it at every H100 table entry measured; fp8 gained at one entry and lost at another
        # (benchmarks/RESULTS.md).
        gate_up, down = replace(gate_up, short_m=bm // 4), replace(down, short_m=bm // 4)
    return MoEConfig(bm, gate_up, down)


def lookup_tokens(num_pairs: int, top_k: int, local_experts: int, global_experts: int | None) -> int:
    """The token count whose tuned table entry fits num_pairs choices over local_experts experts (of
    global_experts in the model; None = these are all): the tables are tuned on M tokens routed top-k
    uniformly over the model's experts, i.e. M*k/E choices per expert. Rows that an all-to-all sent here only
    because they have a choice here carry more choices per row, so their row count under-counts the work
    (measured on an H100, benchmarks/RESULTS.md: keying on it picked tiles 0.8-3% slower at EP 4 and 8 for
    256-512 tokens; near 1024 tokens, between two table entries, the two keys were within 3.4% either way)."""
    return max(1, round(num_pairs * (global_experts or local_experts) / (top_k * local_experts)))


@functools.lru_cache(maxsize=4096)
def get_config(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
               fp8: bool, elem_bytes: int | None = None, global_experts: int | None = None) -> MoEConfig:
    """Tuned entry nearest to num_tokens for this shape, else the heuristic; with elem_bytes (the operands'
    bytes: fp8 1, bf16 2, fp32 4) fitted to shared memory (`fit_shared_memory`).

    num_experts: the experts this call's weights hold (w13.shape[0]); global_experts: the model's routed
    expert count when they are only this rank's share under expert parallelism. Lookup order: the table for
    num_experts (a table tuned for this rank's share, as E32_H7168_I2048 for a DeepSeek-V3 EP-8 rank, wins);
    else, when global_experts is given and differs, the table for global_experts; else `default_config`.
    Why the global table: with the all-gather dispatcher every rank sees all M tokens (choices held elsewhere
    are -1), so under the uniform routing the tables are tuned on each local expert receives
    M*k/global_experts pairs, the same as in the unsharded call at the same M. With the all-to-all
    dispatcher a rank's rows are only the tokens with at least one local choice, so their count under-counts
    the pairs per local expert; callers that know the pair count pass the equivalent token count as
    num_tokens instead (`lookup_tokens`, which also accounts for redundant experts' extra slots). Keyed on M
    (the all-gather rows), a rank with redundant experts (EPLB) is looked up as if each of its slots got
    M*k/E pairs; with E + R physical experts in all each gets about M*k/(E + R)."""
    table = load_table(table_name(num_experts, hidden, inter, fp8))
    if not table and global_experts is not None and global_experts != num_experts:
        table = load_table(table_name(global_experts, hidden, inter, fp8))
    if table:
        cfg = nearest(table, num_tokens)
    else:
        cfg = default_config(num_tokens, num_experts, hidden, inter, top_k, fp8)
    return cfg if elem_bytes is None else fit_shared_memory(cfg, elem_bytes)


def fit_shared_memory(cfg: MoEConfig, elem_bytes: int) -> MoEConfig:
    """cfg with each GEMM's num_stages lowered (to 1 at least) until its pipeline buffers, (block_m x block_k
    activations, plus short_m x block_k for a tail tile's, + block_n x block_k weights, gate and up for gate/up)
    x elem_bytes per stage, fit SMEM_BUDGET (with pairs "one", both to the depth that fits both). The tables are
    tuned for 1- and 2-byte operands; fp32 operands (tests, tiny models) need fewer stages."""

    def fit(g: GemmConfig, weight_tiles: int) -> GemmConfig:
        rows = cfg.block_m + (g.short_m if g.tail_m else 0)
        per_stage = (rows + weight_tiles * g.block_n) * g.block_k * elem_bytes
        stages = g.num_stages
        while stages > 1 and stages * per_stage > SMEM_BUDGET:
            stages -= 1
        return g if stages == g.num_stages else replace(g, num_stages=stages)

    gate_up, down = fit(cfg.gate_up, 2), fit(cfg.down, 1)
    if cfg.pairs == "one":  # one launch, one pipeline depth: the shallower fits both
        stages = min(gate_up.num_stages, down.num_stages)
        gate_up, down = replace(gate_up, num_stages=stages), replace(down, num_stages=stages)
    return cfg if (gate_up, down) == (cfg.gate_up, cfg.down) else replace(cfg, gate_up=gate_up, down=down)


def save_table(path: Path, configs: dict[int, MoEConfig], note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"note": note, "configs": {str(m): c.to_dict() for m, c in sorted(configs.items())}}
    path.write_text(json.dumps(body, indent=1) + "\n")
