"""A batch-1 decode step's decoder layers, all of them, as one persistent warp-specialised Gluon kernel (Hopper,
Triton 3.6), for Qwen3-MoE's GQA layer at Qwen3-30B-A3B's shape.

Why: at batch 1 a layer is four weight streams (qkv, o, the chosen experts' gate/up and down) and small steps
between them (norms, rotary, attention, the router's top-k). As separate launches each stream pays its own ramp
and every small step waits for the one before; the engine's layer took 65.5 µs against a 39 µs byte floor
(benchmarks/RESULTS.md, "Engine on one H100"). Here one program a multiprocessor runs every layer:

- a producer warp streams the program's share of every step's weight tiles (64 rows x 128 k, bf16) by TMA into
  a ring of shared-memory stages, layer after layer, as far ahead as the ring reaches. It waits only for a free
  stage, for at most CAP loads in flight, and before the experts' tiles for the router's choice. The past
  tokens' K and V tiles stream through the same ring (a 64-token tile is 64 / block_size pages, addressed
  through the request's block table);
- one consumer warpgroup runs each step on the tensor cores once the step's input is whole (grid barriers
  between steps): the step's input is staged in shared memory as bf16, row 0 of [8, 64] tiles, and each ring
  tile, loaded into registers, is wgmma m64n8 against it (`_unit_mma`). Norms come from the staged values.

A layer's steps, each program taking an even share of each step's (row tile, k step) units:
    qkv   = Wqkv . norm_in(x)                       (x: the residual stream, the layer's input)
            and the router's part from x: Nx . norm_in(x)
    attn  = GQA decode over the paged cache: flash-decoding partials per (kv head, split of 64-token tiles),
            q normalised and rotated; each kv head's new token a unit of its own (its k normalised and rotated,
            its score and v, its k and v stored to its cache slot)
    o     = Wo . merge(partials)                    (a: the merged attention output)
            and, first, the router's part from a: Ma . a, one unit a (router row tile, head) on the program
            that stages that head anyway (`_anchor`)
    r     = Wr . norm_post(x + o) = (Nx . norm_in(x) * rms(x) + Ma . a) / rms(x + o) (router logits), in every
            program from the two parts' sums once every Ma unit is in (a count, not a grid barrier), before o's
            own tiles: top-8 by ranks of the logits times rms(x + o) (as fp32, ties to the lower expert); after
            o, the softmax over the 8 of the logits rounded to bf16 as the model's are
    gu    = W13[e] . norm_post(x + o)               (the 8 chosen experts)
    x'    = x + o + sum_j p_j W2[e_j] . (silu(g_j) * u_j)
The router's weights are folded once at set-up (`fold_router`): Nx = Wr diag(w_post) / w_in, Ma = Wr diag(w_post)
Wo, so the router needs no step and no grid barrier of its own, and the choice does not wait for o's output (its
ranks do not change with the positive scale 1 / rms(x + o)): the producer streams the chosen experts' tiles while
the consumers run o's tiles.
Sums are fixed-order: each program's partial for a row tile goes to its own slot, summed in slot order by the
reader, so a step's result does not depend on timing (reruns are bit-equal). The residual stream is float32.

Only this shape, block sizes dividing 64, bf16, rope without scaling, no expert parallelism: `DecodeStack.reason`
says why a model does not take it; the engine then runs its per-op kernels. The measured path and its options
are in `benchmarks/decode_layer_probe.py` / `decode_layer_gluon.py` (benchmarks/RESULTS.md, "Engine on one H100 /
Sessions 27-29").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gluon_support import (
    fence_async_shared,
    gl,
    gluon,
    gluon_platform_problem,
    host_descriptor,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .norm import rms_normed
from .pdl import launch_kwargs, pdl_enter, pdl_supported

# The shape (Qwen3-30B-A3B): hidden, query heads, kv heads, head dim, experts, top-k, expert intermediate.
HID, Q_HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, INTER = 2048, 32, 4, 128, 128, 8, 768
EPS = 1e-6
QKV, ATT = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, Q_HEADS * HEAD_DIM
QKV_ROWS = QKV + EXPERTS  # the qkv step's output: q, k, v, then the router's part from x (Nx . norm_in(x))
ROWS, TILE = 64, 128  # a ring stage: 64 weight rows x 128 k, 16 KB of bf16
CHUNK = 64  # the staged input's chunks: the B operand of one k-64 wgmma
XS = 32  # staged chunks at most
CHUNK_TOKENS = 64  # attention: a K or V tile is 64 tokens of one kv head
SPLITS = 32  # attention: at most this many splits a kv head (each a run of 64-token tiles)
MERGE_UNITS = 8  # the o step's units a program has at most (staging's merge)
MIN_PROGRAMS = 128  # o's 1024 units over at least 128 programs: at most MERGE_UNITS each
# The counts the programs meet at (int32, reset by `_enter_kernel`): the grid barrier's at 0 and, a 128-byte L2
# line further, the o step's router units in (`_router_first`) at ROUTER_COUNT.
COUNTS, ROUTER_COUNT = 64, 32
# `DecodeStack.launch(trace=...)`: the GPU timer (ns) at these points, a row of MARKS a layer and program (the
# probe's kernels mark them too; `benchmarks/decode_layer_gluon.trace_report` reads both). Consumer: the layer's
# start, each step's end (arrival at its grid barrier) and the barrier's passing ("kv": the attention), the
# router's choice published; producer: before and after waiting for that choice. (The router has no step of its own:
# "r done" and "r passed" both mark its logits read in, in `_top_k`; in the engine's stack that is before o's
# tiles, between "o staged" and "o first tile".)
TRACE_MARKS = ("start", "qkv done", "qkv passed", "kv done", "kv passed", "o done", "o passed", "r done",
               "r passed", "ids published", "gu done", "gu passed", "down done", "producer waits ids",
               "producer has ids", "producer issued qkv",
               *(f"{step} {what}" for step in ("qkv", "o", "gu", "down") for what in ("staged", "first tile",
                                                                                      "last tile", "tiles done")))
MARKS = 32
# Fixed-order sums: (output, rows, k steps a row tile, slots): slots are the most programs that share one of the
# output's row tiles at up to 144 programs (checked at launch).
DET_OUTPUTS = (("qkv", QKV_ROWS, HID // TILE, 3), ("o", HID, ATT // TILE, 5),
               ("gu", TOP_K * 2 * INTER, HID // TILE, 2), ("x", HID, TOP_K * INTER // TILE, 5))
# The workspace (float32), one for all layers: each output's slots, the router's part from a (Ma . a: a slot a
# query head, `_anchor`), the chosen experts' weights, the residual stream (the layer's input, and h =
# input + o), the attention's partials (maxima, sums, outputs).
_PARTS = KV_HEADS * (SPLITS + 1) * (Q_HEADS // KV_HEADS)  # (kv head, split) units and the new token's
OFFS: dict[str, int] = {}
_at = 0
for _name, _size in (*((f"{name}_p", slots * rows) for name, rows, _, slots in DET_OUTPUTS),
                     ("m_p", Q_HEADS * EXPERTS), ("p", TOP_K), ("xin", HID), ("h", HID), ("am", _PARTS), ("al", _PARTS),
                     ("ao", _PARTS * HEAD_DIM)):
    OFFS[_name] = _at
    _at += _size
WS = _at

if gluon is not None:
    _HID, _QKV, _ATT, _QKV_ROWS = gl.constexpr(HID), gl.constexpr(QKV), gl.constexpr(ATT), gl.constexpr(QKV_ROWS)
    _EXPERTS, _TOP_K, _INTER = gl.constexpr(EXPERTS), gl.constexpr(TOP_K), gl.constexpr(INTER)
    _T, _R, _CH, _XS = gl.constexpr(TILE), gl.constexpr(ROWS), gl.constexpr(CHUNK), gl.constexpr(XS)
    _HK = gl.constexpr(TILE // CHUNK)  # staged chunks a unit
    _KVH, _HD, _CT = gl.constexpr(KV_HEADS), gl.constexpr(HEAD_DIM), gl.constexpr(CHUNK_TOKENS)
    _GRP = gl.constexpr(Q_HEADS // KV_HEADS)  # query heads a kv head (8: wgmma's N)
    _SPLITS, _MERGE_UNITS = gl.constexpr(SPLITS), gl.constexpr(MERGE_UNITS)
    _SM_SCALE, _EPS = gl.constexpr(HEAD_DIM ** -0.5), gl.constexpr(EPS)
    _GU_TILES = gl.constexpr(2 * INTER // ROWS)  # an expert's row tiles in gate/up (gate's, then up's)
    _DN_STEPS = gl.constexpr(INTER // TILE)  # an expert's k steps in down
    _O_QKV_P, _O_O_P, _O_M_P = gl.constexpr(OFFS["qkv_p"]), gl.constexpr(OFFS["o_p"]), gl.constexpr(OFFS["m_p"])
    _O_GU_P, _O_X_P = gl.constexpr(OFFS["gu_p"]), gl.constexpr(OFFS["x_p"])
    _O_P = gl.constexpr(OFFS["p"])
    _O_XIN, _O_H = gl.constexpr(OFFS["xin"]), gl.constexpr(OFFS["h"])
    _O_AM, _O_AL, _O_AO = gl.constexpr(OFFS["am"]), gl.constexpr(OFFS["al"]), gl.constexpr(OFFS["ao"])
    _C_QKV, _C_O, _C_GU, _C_X = (gl.constexpr(slots) for _, _, _, slots in DET_OUTPUTS)
    _R_TILES = gl.constexpr(EXPERTS // ROWS)  # the router's row tiles
    _ACC_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]))
    _A_RS_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_ACC_L, k_width=2))  # wgmma's A in registers
    _IDS_L = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # the producer warp's copy of the choice
    _MERGE_BATCH = gl.constexpr(8)  # partials merged a loop step (all at once spill)
    _MARKS = gl.constexpr(MARKS)
    _ROUTER_COUNT = gl.constexpr(ROUTER_COUNT)

    @gluon.jit
    def _mark(trace, i: gl.constexpr, TRACE: gl.constexpr):
        """TRACE: the GPU's global nanosecond timer into trace[i] (`TRACE_MARKS`)."""
        if TRACE:
            now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                            pack=1)
            gl.store(trace + i, now)

    @gluon.jit
    def _units(pid, nprog, total):
        """Program pid's share [u0, u1) of total units, split evenly over min(nprog, total) programs."""
        n = gl.minimum(nprog, total)
        return gl.minimum(pid, n) * total // n, gl.minimum(pid + 1, n) * total // n

    @gluon.jit
    def _owner(u, nprog, total):
        """The program whose `_units` share holds unit u."""
        n = gl.minimum(nprog, total)
        return ((u + 1) * n + total - 1) // total - 1

    @gluon.jit
    def _get(buf, idx, N: gl.constexpr, KS: gl.constexpr, C: gl.constexpr, nprog):
        """Values idx of a step's output from its partial slots: buf[j * N + idx] summed in slot order, j below
        the count of programs that wrote row idx's tile (N rows in tiles of ROWS, KS units a tile, C slots)."""
        total = (N // _R) * KS
        t = idx // _R
        first = _owner(t * KS, nprog, total)
        count = _owner(t * KS + KS - 1, nprog, total) - first + 1
        x = gl.load(buf + idx)
        for j in gl.static_range(1, C):
            x += gl.load(buf + j * N + idx, mask=j < count, other=0.0)
        return x

    @gluon.jit
    def _qkv_get(qkv, idx, nprog):
        """Values idx of the qkv step's output (`_get`)."""
        return _get(qkv, idx, _QKV_ROWS, _HID // _T, _C_QKV, nprog)

    @gluon.jit
    def _claim(ring, ready, empty, c, CAP: gl.constexpr):
        """Producer: ring stage c % STAGES, once it is free and the load CAP before this one has arrived (at most
        CAP loads in flight a program). Returns the stage."""
        STAGES: gl.constexpr = ring.type.shape[0]
        if c >= CAP:
            mbarrier.wait(ready.index((c - CAP) % STAGES), ((c - CAP) // STAGES) & 1)
        s = c % STAGES
        # A fresh barrier counts as having completed the phase before phase 0: round 0 passes at once.
        mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        return s

    @gluon.jit
    def _issue(desc, row, col, ring, ready, empty, c, CAP: gl.constexpr):
        """Producer: the weight tile at (row, col) into the next ring stage."""
        s = _claim(ring, ready, empty, c, CAP)
        mbarrier.expect(ready.index(s), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [row, col], ready.index(s), ring.index(s))
        return c + 1

    @gluon.jit
    def _tile_pages(table_ptr, width, tile, BS: gl.constexpr):
        """The block table's pages of tokens [64 tile, 64 tile + 64), in one load (pages past the table's width
        read its last entry: past the context, masked by the consumers)."""
        j = gl.arange(0, _CT // BS, layout=_IDS_L)
        return gl.load(table_ptr + gl.minimum(tile * (_CT // BS) + j, width - 1))

    @gluon.jit
    def _issue_kv(desc, row0, pages, col, ring, ready, empty, c, CAP: gl.constexpr, BS: gl.constexpr):
        """Producer: a 64-token tile of one kv head (columns col of desc's rows, a token a row, from row0 on) into
        the next ring stage, a page of BS tokens at a time (`_tile_pages`)."""
        s = _claim(ring, ready, empty, c, CAP)
        mbarrier.expect(ready.index(s), _CT * _HD * 2)
        for j in gl.static_range(_CT // BS):
            page = gl.sum(gl.where(gl.arange(0, _CT // BS, layout=_IDS_L) == j, pages, 0), axis=0)
            tma.async_copy_global_to_shared(desc, [row0 + page * BS, col], ready.index(s),
                                            ring.index(s).slice(j * BS, BS, dim=0))
        return c + 1

    @gluon.jit
    def _splits(n_past):
        """Attention's tiles a kv head (at least one: the new token alone has a tile of no past tokens) and its
        splits."""
        tiles = gl.maximum((n_past + _CT - 1) // _CT, 1)
        return tiles, gl.minimum(tiles, _SPLITS)

    @gluon.jit
    def _produce_dense(desc, row0, N_TILES: gl.constexpr, KSTEPS: gl.constexpr, ring, ready, empty, c, pid, nprog,
                       CAP: gl.constexpr, ids=None, EXPERT_TILES: gl.constexpr = 0, desc2=None, row2=0,
                       TILES2: gl.constexpr = 0):
        """The program's units of a GEMV over desc's rows from row0, a row tile's k steps in turn. EXPERT_TILES: the
        rows are experts of EXPERT_TILES row tiles each, and row tile t is tile t % EXPERT_TILES of expert
        ids[t // EXPERT_TILES] (gate/up over the chosen experts). TILES2: the last TILES2 row tiles are desc2's
        rows from row2 (qkv's router part)."""
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        for u in range(u0, u1):
            t = u // KSTEPS
            if EXPERT_TILES:
                e = gl.sum(gl.where(gl.arange(0, _TOP_K, layout=_IDS_L) == t // EXPERT_TILES, ids, 0), axis=0)
                row = row0 + e * (EXPERT_TILES * _R) + (t % EXPERT_TILES) * _R
            else:
                row = row0 + t * _R
            if TILES2:
                if t >= N_TILES - TILES2:
                    c = _issue(desc2, row2 + (t - (N_TILES - TILES2)) * _R, (u % KSTEPS) * _T, ring, ready, empty, c,
                               CAP)
                else:
                    c = _issue(desc, row, (u % KSTEPS) * _T, ring, ready, empty, c, CAP)
            else:
                c = _issue(desc, row, (u % KSTEPS) * _T, ring, ready, empty, c, CAP)
        return c

    @gluon.jit
    def _anchor_tile(u):
        """For the o step's unit u (row tile t = u // KS, head ks = u % KS): Ma's row tile m = (t - R_TILES * ks)
        mod (HID / ROWS), which the unit takes where m < R_TILES (`_anchor`), and ks."""
        O_TILES: gl.constexpr = _HID // _R
        KS: gl.constexpr = _ATT // _T
        ks = u % KS
        return (u // KS + 2 * O_TILES - _R_TILES * ks) % O_TILES, ks

    @gluon.jit
    def _anchor(pid, nprog):
        """The o step's unit of this program that also takes a unit of the router's part from a (Ma . a), or -1:
        the unit whose `_anchor_tile` is below R_TILES. Each (m, ks) has one unit, 16 units apart (a program has
        at most 8: at most one each), and its head is staged already."""
        u0, u1 = _units(pid, nprog, (_HID // _R) * (_ATT // _T))
        found = u0 - u0 - 1  # -1 as a run-time value, which the loop may replace
        for u in range(u0, u1):
            m, _ = _anchor_tile(u)
            if m < _R_TILES:
                found = u
        return found

    @gluon.jit
    def _producer(d_qkv, d_o, d_nx, d_ma, d_13, d_2, d_kc, d_vc, ring, ready, empty, ids_bar, ids_smem, pos_ptr,
                  table_ptr, width, cache_rows, layers, trace_ptr, CAP: gl.constexpr, CAP_GU: gl.constexpr,
                  BS: gl.constexpr, TRACE: gl.constexpr):
        """Every step's tiles, layer after layer, into the ring; before the gate/up tiles, the router's choice
        (from ids_smem, once the consumers have published it). Gate/up's tiles stream with CAP_GU loads in flight
        (no grid barrier waits while they stream), the others' with CAP."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_past = gl.load(pos_ptr).to(gl.int32)
        tiles, splits = _splits(n_past)
        a0, a1 = _units(pid, nprog, _KVH * (splits + 1))  # the program's attention units (`_attend`)
        a1 = gl.minimum(a1, _KVH * splits)  # the new token's have no tiles
        first_tile = (a0 % splits) * tiles // splits
        first_pages = _tile_pages(table_ptr, width, first_tile, BS)  # the same every layer: loaded once
        anchor = _anchor(pid, nprog)
        c = 0
        for layer in range(layers):
            trace = trace_ptr + (layer * nprog + pid) * _MARKS
            c = _produce_dense(d_qkv, layer * _QKV, _QKV_ROWS // _R, _HID // _T, ring, ready, empty, c, pid, nprog,
                               CAP, desc2=d_nx, row2=layer * _EXPERTS, TILES2=_R_TILES)
            _mark(trace, 15, TRACE)
            for u in range(a0, a1):  # each tile's K, then its V
                h = u // splits
                s = u % splits
                for tile in range(s * tiles // splits, (s + 1) * tiles // splits):
                    if (u == a0) & (tile == first_tile):
                        pages = first_pages
                    else:
                        pages = _tile_pages(table_ptr, width, tile, BS)
                    c = _issue_kv(d_kc, layer * cache_rows, pages, h * _HD, ring, ready, empty, c, CAP, BS)
                    c = _issue_kv(d_vc, layer * cache_rows, pages, h * _HD, ring, ready, empty, c, CAP, BS)
            if anchor >= 0:  # its Ma tile before its o tiles (`_consumer`: the router's part first)
                m, ks = _anchor_tile(anchor)
                c = _issue(d_ma, layer * _EXPERTS + m * _R, ks * _T, ring, ready, empty, c, CAP)
            c = _produce_dense(d_o, layer * _HID, _HID // _R, _ATT // _T, ring, ready, empty, c, pid, nprog, CAP)
            _mark(trace, 13, TRACE)
            mbarrier.wait(ids_bar, layer & 1)  # this program's consumers have stored the router's choice
            _mark(trace, 14, TRACE)
            ids = ids_smem.load(_IDS_L)
            c = _produce_dense(d_13, layer * _EXPERTS * 2 * _INTER, _TOP_K * _GU_TILES, _HID // _T, ring, ready,
                               empty, c, pid, nprog, CAP_GU, ids, _GU_TILES)
            KD: gl.constexpr = _TOP_K * _DN_STEPS
            u0, u1 = _units(pid, nprog, (_HID // _R) * KD)
            for u in range(u0, u1):
                ks = u % KD
                e = gl.sum(gl.where(gl.arange(0, _TOP_K, layout=_IDS_L) == ks // _DN_STEPS, ids, 0), axis=0)
                c = _issue(d_2, (layer * _EXPERTS + e) * _HID + (u // KD) * _R, (ks % _DN_STEPS) * _T, ring, ready,
                           empty, c, CAP)

    @gluon.jit
    def _grid_sync(bar_ptr, target):
        """Arrive at the grid barrier (a count that only grows) and wait for it to reach target."""
        gl.thread_barrier()  # every thread's stores of the step before the (single-thread) release
        gl.atomic_add(bar_ptr, 1, sem="release")
        while gl.atomic_add(bar_ptr, 0, sem="acquire") < target:
            pass
        gl.thread_barrier()

    @gluon.jit
    def _x_chunk(x_ptr, p_ptr, ks, cols, ACT: gl.constexpr, SN: gl.constexpr, SKS: gl.constexpr,
                 SC: gl.constexpr, nprog, plain, splits):
        """The step's input at k step ks, columns cols. ACT 0: x_ptr's plain values; 1 (down; x_ptr: gate/up's
        slots): silu(g) * u * p of expert ks // DN_STEPS's channels; 2 (o; x_ptr: the workspace): the attention
        output of query head ks, merged from its splits' partials (`_attend`); 3 (the residual stream): x_ptr's
        slots plus p_ptr's values (plain: p_ptr's only, in any float type). SN, SKS, SC: x_ptr's slots (`_get`)."""
        if ACT == 0:
            x = gl.load(x_ptr + ks * _T + cols)
        elif ACT == 1:
            j = ks // _DN_STEPS
            ch = (ks % _DN_STEPS) * _T + cols
            g = _get(x_ptr, j * 2 * _INTER + ch, SN, SKS, SC, nprog)
            up = _get(x_ptr, j * 2 * _INTER + _INTER + ch, SN, SKS, SC, nprog)
            x = g / (1.0 + gl.exp(-g)) * up * gl.load(p_ptr + j)
        elif ACT == 2:
            gl.static_assert(_T == _HD, "a k step is one query head's output")
            # Query head ks's partials: kv head kh's splits (kh * splits + s) * GRP + g, then its new token's
            # (KV_HEADS * splits + kh) * GRP + g (`_attend`). Their maxima and sums in one load, along cols.
            kh = ks // _GRP
            g = ks % _GRP
            s_all = cols % _CH  # [rows, 64]: split s in column s (at most SPLITS + 1 <= 64)
            i_all = gl.where(s_all < splits, (kh * splits + s_all) * _GRP + g, (_KVH * splits + kh) * _GRP + g)
            m_all = gl.load(x_ptr + _O_AM + i_all, mask=s_all <= splits, other=float("-inf"))
            l_all = gl.load(x_ptr + _O_AL + i_all, mask=s_all <= splits, other=0.0)
            top = gl.max(m_all, axis=1)[:, None]
            den = gl.sum(gl.exp(m_all - top) * l_all, axis=1)[:, None]
            num = gl.zeros_like(cols.to(gl.float32))
            for s0 in range(0, splits, _MERGE_BATCH):  # the splits' outputs, MERGE_BATCH a loop step
                for cc in gl.static_range(_MERGE_BATCH):
                    sc = s0 + cc
                    ok = sc < splits
                    i = (kh * splits + sc) * _GRP + g
                    w = gl.exp(gl.load(x_ptr + _O_AM + i, mask=ok, other=float("-inf")) - top)  # again: L1
                    num += w * gl.load(x_ptr + _O_AO + i * _HD + cols, mask=ok, other=0.0)
            i = (_KVH * splits + kh) * _GRP + g  # the new token's
            num += gl.exp(gl.load(x_ptr + _O_AM + i) - top) * gl.load(x_ptr + _O_AO + i * _HD + cols)
            x = num / den
        else:
            if plain:
                x = gl.load(p_ptr + ks * _T + cols)
            else:
                x = _get(x_ptr, ks * _T + cols, SN, SKS, SC, nprog) + gl.load(p_ptr + ks * _T + cols)
        return x

    @gluon.jit
    def _stage_input(x_ptr, p_ptr, scale, xs, first, KSTEPS: gl.constexpr, NS: gl.constexpr, ACT: gl.constexpr,
                     NORM: gl.constexpr, n, SN: gl.constexpr, SKS: gl.constexpr, SC: gl.constexpr, nprog, plain,
                     w_ptr, xout_ptr, WMODE: gl.constexpr, pid, splits):
        """The step's input for the tensor cores: unit slot j < NS is k step (first + j) % KSTEPS (`_x_chunk`)
        times scale, in bf16, as HK chunks of 64 (row 0 of xs's [8, 64] tiles j * HK ...); visible to the next
        wgmma when this returns. NORM (every k step staged): scale is 1 / rms of the values loaded. ACT 2: slots
        from n on (past the program's units) repeat slot n - 1's head, so the merge's loads hit L1. WMODE 1: the
        values also times the norm's weight w_ptr[k]; 2: and program 0 stores the values as loaded (the residual
        stream, for the steps after) to xout_ptr. Returns the scale."""
        ks, col = _stage_slots(first, KSTEPS, NS, n, REPEAT=ACT == 2)
        x = _x_chunk(x_ptr, p_ptr, ks, col, ACT, SN, SKS, SC, nprog, plain, splits)
        return _stage_store(x, ks, col, scale, xs, KSTEPS, NS, NORM, WMODE, w_ptr, xout_ptr, pid)

    @gluon.jit
    def _stage_slots(first, KSTEPS: gl.constexpr, NS: gl.constexpr, n, REPEAT: gl.constexpr,
                     HK: gl.constexpr = TILE // CHUNK):
        """`_stage_input`'s k steps and columns: [NS * HK, 64] (a k step is HK chunks of 64), slot j < NS k step
        (first + j) % KSTEPS; REPEAT: slots from n on repeat slot n - 1's."""
        SL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        q = gl.arange(0, NS * HK, layout=gl.SliceLayout(1, SL))
        cols = gl.arange(0, _CH, layout=gl.SliceLayout(0, SL))
        j = q // HK
        if REPEAT:
            j = gl.minimum(j, gl.maximum(n - 1, 0))
        return ((first + j) % KSTEPS)[:, None], ((q % HK) * _CH)[:, None] + cols[None, :]

    @gluon.jit
    def _stage_store(x, ks, col, scale, xs, KSTEPS: gl.constexpr, NS: gl.constexpr, NORM: gl.constexpr,
                     WMODE: gl.constexpr, w_ptr, xout_ptr, pid, T: gl.constexpr = TILE,
                     HK: gl.constexpr = TILE // CHUNK):
        """`_stage_input`'s values x at (ks, col) (`_stage_slots`; k steps of T values) times scale (NORM: 1 / rms
        of x) and WMODE's weight, to xs in bf16; returns the scale."""
        if WMODE >= 1:  # loaded before the norm's reduction (a thread barrier), with x's loads in flight
            w = gl.load(w_ptr + ks * T + col).to(gl.float32)
        if NORM:
            gl.static_assert(NS == KSTEPS, "the norm needs the whole input staged")
            scale = 1.0 / gl.sqrt(gl.sum(gl.sum(x * x, axis=1), axis=0) / (NS * T) + _EPS)
        if WMODE == 2:
            if pid == 0:
                gl.store(xout_ptr + ks * T + col, x)
        x = x * scale
        if WMODE >= 1:
            x = x * w
        flat = xs._reinterpret(gl.bfloat16, [_XS, 8 * _CH], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        flat.slice(0, NS * HK, dim=0).slice(0, _CH, dim=1).store(x.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        return scale

    @gluon.jit
    def _flush(y_ptr, t, rows, acc, N: gl.constexpr, KS: gl.constexpr, pid, nprog):
        """Row tile t's sums so far (column 0 of the MMA sums) to this program's slot of the output (N rows, KS
        units a tile; `_get`); returns fresh sums."""
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        y = y_ptr + (pid - _owner(t * KS, nprog, (N // _R) * KS)) * N + t * _R + rows
        gl.store(y, gl.sum(acc, axis=1))
        return gl.zeros([64, 8], gl.float32, _ACC_L)

    @gluon.jit
    def _unit_mma(w, empty, xs, slot, acc):
        """A unit's MMAs: its ring tile w (64 rows x 128 k) against the staged input's k step in slot, as two
        wgmma m64n8 k-64 with the tile's halves loaded into registers first; its stage is released (empty) once
        every warp has them. (With the wgmma reading the tile from shared memory a unit took about 0.42 us, from
        registers 0.24: benchmarks/RESULTS.md, session 31.) Returns acc plus the unit's sums."""
        a_lo = w.slice(0, _CH, dim=1).load(_A_RS_L)
        a_hi = w.slice(_CH, _CH, dim=1).load(_A_RS_L)
        acc = warpgroup_mma(a_lo, xs.index(2 * slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a_hi, xs.index(2 * slot + 1).permute((1, 0)), acc, is_async=True)
        gl.thread_barrier()  # the tile is in every warp's registers: its stage is free
        mbarrier.arrive(empty)
        acc, a_lo, a_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_lo, a_hi))  # (the wgmma reads a_*)
        return acc

    @gluon.jit
    def _gemv(x_ptr, y_ptr, p_ptr, scale, N_TILES: gl.constexpr, K: gl.constexpr, ACT: gl.constexpr, ring, ready,
              empty, xs, c, pid, nprog, NORM: gl.constexpr = False, SN: gl.constexpr = 0, SKS: gl.constexpr = 0,
              SC: gl.constexpr = 0, plain=False, w_ptr=0, xout_ptr=0, WMODE: gl.constexpr = 0, splits=1,
              STAGE: gl.constexpr = True, trace=0, MK: gl.constexpr = 0, TRACE: gl.constexpr = False):
        """A step's GEMV over the program's units: the input staged (`_stage_input`, then trace mark MK; STAGE
        False: the caller staged it and marked it, as o's and gate/up's are, around the router's choice), then each
        unit's ring tile against it (`_unit_mma`), its stage released once the tile is in registers; each row
        tile's sums to the program's slot (`_flush`). Returns the ring count and the scale."""
        STAGES: gl.constexpr = ring.type.shape[0]
        KSTEPS: gl.constexpr = K // _T
        NS: gl.constexpr = _MERGE_UNITS if ACT == 2 else (KSTEPS if KSTEPS < _XS // _HK else _XS // _HK)
        WHOLE: gl.constexpr = NS == KSTEPS  # every k step staged: slot ks holds k step ks
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        n = u1 - u0
        if STAGE:
            scale = _stage_input(x_ptr, p_ptr, scale, xs, 0 if WHOLE else u0, KSTEPS, NS, ACT, NORM, n, SN, SKS, SC,
                                 nprog, plain, w_ptr, xout_ptr, WMODE, pid, splits)
            _mark(trace, MK, TRACE)
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, _ACC_L))
        acc = gl.zeros([64, 8], gl.float32, _ACC_L)
        for i in range(n):
            u = u0 + i
            t = u // KSTEPS
            s = (c + i) % STAGES
            mbarrier.wait(ready.index(s), ((c + i) // STAGES) & 1)
            if TRACE:
                if i == 0:
                    _mark(trace, MK + 1, TRACE)
                if i + 1 == n:
                    _mark(trace, MK + 2, TRACE)
            slot = u % KSTEPS if WHOLE else i
            acc = _unit_mma(ring.index(s), empty.index(s), xs, slot, acc)
            if ((u + 1) // KSTEPS != t) | (i + 1 == n):
                acc = _flush(y_ptr, t, rows, acc, N_TILES * _R, KSTEPS, pid, nprog)
        _mark(trace, MK + 3, TRACE)
        return c + n, scale

    @gluon.jit
    def _router_first(ring, ready, empty, xs, c, anchor, u0, m_ptr, cnt_ptr, target):
        """The o step's router part, before its tiles: the anchor program (`_anchor`; anchor >= 0, its o units
        from u0, their heads staged) runs its Ma unit from the next ring tile into m_ptr's slot of its head and
        counts it in at cnt_ptr (a count that only grows); then every program waits for the count to reach
        target (every anchor's unit of this layer). Returns the ring count."""
        STAGES: gl.constexpr = ring.type.shape[0]
        if anchor >= 0:
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = _unit_mma(ring.index(s), empty.index(s), xs, anchor - u0, gl.zeros([64, 8], gl.float32, _ACC_L))
            m, ks = _anchor_tile(anchor)
            rows = gl.arange(0, 64, layout=gl.SliceLayout(1, _ACC_L))
            gl.store(m_ptr + (m * _R + rows) * (_ATT // _T) + ks, gl.sum(acc, axis=1))
            c += 1
            gl.thread_barrier()
            gl.atomic_add(cnt_ptr, 1, sem="release")
        while gl.atomic_add(cnt_ptr, 0, sem="acquire") < target:
            pass
        gl.thread_barrier()
        return c

    @gluon.jit
    def _norm_rope(a, b, w, d, cos, sin, ROW: gl.constexpr):
        """Qwen3's per-head RMSNorm (weight w, [HEAD_DIM] bf16) then rotary embedding (cos and sin of the position's
        angles at dims d), on a head's two 64-dim halves a and b (d: their dims; ROW: rows of heads [8, 64], else
        one head [64]). The norm's output is rounded to bf16 as transformers' is."""
        wa = gl.load(w + d).to(gl.float32)
        wb = gl.load(w + _CH + d).to(gl.float32)
        if ROW:
            r = gl.rsqrt((gl.sum(a * a, axis=1) + gl.sum(b * b, axis=1)) / _HD + _EPS)[:, None]
            a = (a * r * wa[None, :]).to(gl.bfloat16).to(gl.float32)
            b = (b * r * wb[None, :]).to(gl.bfloat16).to(gl.float32)
            return a * cos[None, :] - b * sin[None, :], b * cos[None, :] + a * sin[None, :]
        else:
            r = gl.rsqrt((gl.sum(a * a, axis=0) + gl.sum(b * b, axis=0)) / _HD + _EPS)
            a = (a * r * wa).to(gl.bfloat16).to(gl.float32)
            b = (b * r * wb).to(gl.bfloat16).to(gl.float32)
            return a * cos - b * sin, b * cos + a * sin

    @gluon.jit
    def _q_group(qkv, h, layer, w_q, qi, qd, cos_s, sin_s, nprog):
        """kv head h's query group (8 heads) from the qkv step's slots, normalised, rotated and scaled by
        1/sqrt(d), in bf16 as the score MMA's B operand takes it: two [8, 64] halves."""
        q_rows = (h * _GRP + qi)[:, None] * _HD
        q0 = _qkv_get(qkv, q_rows + qd[None, :], nprog).to(gl.bfloat16).to(gl.float32)
        q1 = _qkv_get(qkv, q_rows + _CH + qd[None, :], nprog).to(gl.bfloat16).to(gl.float32)
        q0, q1 = _norm_rope(q0, q1, w_q + layer * _HD, qd, cos_s.load(qd.type.layout), sin_s.load(qd.type.layout),
                            True)
        q0 = (q0.to(gl.bfloat16).to(gl.float32) * _SM_SCALE).to(gl.bfloat16)
        q1 = (q1.to(gl.bfloat16).to(gl.float32) * _SM_SCALE).to(gl.bfloat16)
        return q0, q1

    @gluon.jit
    def _attend(ws, qkv, ring, ready, empty, qs, ps, c, pid, nprog, layer, w_q, w_k, k_cache, v_cache, cos_s,
                sin_s, pos, slot, tiles, splits, layer_elems):
        """Consumer: the program's attention units of GQA decode, flash-decoding style. Units below KV_HEADS *
        splits are (kv head h, split) runs of 64-token tiles of past tokens: the group's q (`_q_group`) as the B
        operand in qs; each tile S^T = K . q^T ([64 tokens, 8 heads] by wgmma), tokens past the context masked, an
        online softmax by column, O^T += V^T . P^T (V's tile as a transposed A operand, P^T through ps). The last
        KV_HEADS units are each kv head's new token: its k normalised and rotated, its score against the group's
        q (the same bf16 values the tiles see), its v, and its k and v stored to the cache slot; a unit of its
        own, so that the programs with the last tiles do no more than the others. Every unit's maxima, sums and
        unnormalised outputs go to the workspace (am, al, ao: partial u * 8 + head) for the o step to merge."""
        STAGES: gl.constexpr = ring.type.shape[0]
        QL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [8, 64] q halves
        heads_l: gl.constexpr = gl.SliceLayout(0, _ACC_L)
        rows_l: gl.constexpr = gl.SliceLayout(1, _ACC_L)
        qi = gl.arange(0, _GRP, layout=gl.SliceLayout(1, QL))
        qd = gl.arange(0, _CH, layout=gl.SliceLayout(0, QL))
        heads = gl.arange(0, _GRP, layout=heads_l)
        dims = gl.arange(0, 64, layout=rows_l)
        u0, u1 = _units(pid, nprog, _KVH * (splits + 1))
        for u in range(u0, u1):
            past = u < _KVH * splits
            h = gl.where(past, u // splits, u - _KVH * splits)
            q0, q1 = _q_group(qkv, h, layer, w_q, qi, qd, cos_s, sin_s, nprog)
            if past:
                s = u % splits
                qs.index(0).store(q0)
                qs.index(1).store(q1)
                fence_async_shared()
                gl.thread_barrier()
                top = gl.full([_GRP], float("-inf"), gl.float32, heads_l)
                total = gl.zeros([_GRP], gl.float32, heads_l)
                o0 = gl.zeros([64, _GRP], gl.float32, _ACC_L)
                o1 = gl.zeros([64, _GRP], gl.float32, _ACC_L)
                for tile in range(s * tiles // splits, (s + 1) * tiles // splits):
                    acc = _scores(ring, ready, empty, c, qs, STAGES)
                    token = tile * _CT + gl.arange(0, _CT, layout=rows_l)
                    acc = gl.where((token < pos)[:, None], acc, float("-inf"))
                    new_top = gl.maximum(top, gl.max(acc, axis=0))
                    safe = gl.where(new_top == float("-inf"), 0.0, new_top)  # a tile of no past tokens
                    alpha = gl.exp(top - safe)
                    p = gl.exp(acc - safe[None, :])
                    total = total * alpha + gl.sum(p, axis=0)
                    top = new_top
                    o0, o1 = _values(ring, ready, empty, c + 1, STAGES, ps, p, o0, o1, alpha)
                    c += 2
                gl.thread_barrier()  # every warp is done with qs before the next unit's q
            else:  # the new token of kv head h
                k0 = _qkv_get(qkv, _ATT + h * _HD + qd, nprog).to(gl.bfloat16).to(gl.float32)
                k1 = _qkv_get(qkv, _ATT + h * _HD + _CH + qd, nprog)
                k0, k1 = _norm_rope(k0, k1.to(gl.bfloat16).to(gl.float32), w_k + layer * _HD, qd,
                                    cos_s.load(qd.type.layout), sin_s.load(qd.type.layout), False)
                k0 = k0.to(gl.bfloat16)
                k1 = k1.to(gl.bfloat16)
                top = gl.sum(q0.to(gl.float32) * k0.to(gl.float32)[None, :], axis=1)
                top = gl.convert_layout(top + gl.sum(q1.to(gl.float32) * k1.to(gl.float32)[None, :], axis=1),
                                        heads_l)
                total = gl.full([_GRP], 1.0, gl.float32, heads_l)
                v_at = _ATT + _KVH * _HD + h * _HD
                v0 = _qkv_get(qkv, v_at + dims, nprog).to(gl.bfloat16)
                v1 = _qkv_get(qkv, v_at + 64 + dims, nprog).to(gl.bfloat16)
                o0 = gl.zeros([64, _GRP], gl.float32, _ACC_L) + v0.to(gl.float32)[:, None]
                o1 = gl.zeros([64, _GRP], gl.float32, _ACC_L) + v1.to(gl.float32)[:, None]
                at = layer.to(gl.int64) * layer_elems + slot * (_KVH * _HD) + h * _HD  # for the later steps
                gl.store(k_cache + at + qd, k0)
                gl.store(k_cache + at + _CH + qd, k1)
                gl.store(v_cache + at + dims, v0)
                gl.store(v_cache + at + 64 + dims, v1)
            _store_partial(ws + _O_AM, ws + _O_AL, ws + _O_AO, u * _GRP + heads, dims, top, total, o0, o1)
        return c

    @gluon.jit
    def _scores(ring, ready, empty, c, qs, STAGES: gl.constexpr):
        """S^T = K . q^T ([64 tokens, 8 query heads]) for the K tile in ring stage c (of STAGES), the group's q
        (two 64-dim halves) as the B operand in qs; the stage released."""
        s = c % STAGES
        mbarrier.wait(ready.index(s), (c // STAGES) & 1)
        kt = ring.index(s)
        acc = gl.zeros([_CT, _GRP], gl.float32, _ACC_L)
        acc = warpgroup_mma(kt.slice(0, _CH, dim=1), qs.index(0).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(kt.slice(_CH, _CH, dim=1), qs.index(1).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(empty.index(s))
        return acc

    @gluon.jit
    def _values(ring, ready, empty, c, STAGES: gl.constexpr, ps, p, o0, o1, alpha=None):
        """O^T += V^T . P^T for the V tile in ring stage c (of STAGES; a transposed A operand) and the
        probabilities p ([64 tokens, 8 heads], through ps), into o0 and o1 (the two 64-dim halves, [64, 8]; first
        rescaled by alpha [8] where given, the online softmax's); the stage released."""
        ps.store(gl.permute(p, (1, 0)).to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        s = c % STAGES
        mbarrier.wait(ready.index(s), (c // STAGES) & 1)
        vt = ring.index(s)
        if alpha is not None:
            o0 = o0 * alpha[None, :]
            o1 = o1 * alpha[None, :]
        o0 = warpgroup_mma(vt.slice(0, _CH, dim=1).permute((1, 0)), ps.permute((1, 0)), o0, is_async=True)
        o1 = warpgroup_mma(vt.slice(_CH, _CH, dim=1).permute((1, 0)), ps.permute((1, 0)), o1, is_async=True)
        o0, o1 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1))
        gl.thread_barrier()
        mbarrier.arrive(empty.index(s))
        return o0, o1

    @gluon.jit
    def _store_partial(am, al, ao, part, dims, top, total, o0, o1):
        """An attention unit's partials for the o step's merge: its 8 heads' maxima, sums and unnormalised outputs
        (o0, o1: the two 64-dim halves, dims their rows) at partials part (unit * 8 + head) of am, al and ao
        (HEAD_DIM values a partial)."""
        gl.store(am + part, top)
        gl.store(al + part, total)
        gl.store(ao + part[None, :] * _HD + dims[:, None], o0)
        gl.store(ao + part[None, :] * _HD + 64 + dims[:, None], o1)

    @gluon.jit
    def _top_k(qkv_ptr, m_ptr, scale_in, ids_smem, r_s, nprog, trace, TRACE: gl.constexpr):
        """The router's choice, once every Ma unit is in (`_router_first`, before o's tiles): its logits up to the
        positive scale 1 / rms(h) that only the softmax needs (`_route_weights`), Nx . norm_in(x) (the qkv step's
        last rows) over scale_in plus Ma . a (m_ptr: a slot a head, each expert's 32 together, summed in head
        order). Each thread takes one expert's
        logit as an integer key that orders as the logit does, its lowest 7 bits (2^-16 of the value) replaced by
        127 - the expert, so that equal logits rank the lower expert first, and counts the keys that beat its own,
        32 at a time from shared memory (r_s, [E / 32, 32]): the experts ranked 0-7 are the choice. Every program
        computes the same choice from the same values. It goes to ids_smem (ranked order) for the producer.
        Returns the logits and ranks (one expert a thread). TRACE: the timer once the keys are in shared memory
        (the marks of "r done" and "r passed", `TRACE_MARKS`)."""
        ROW32: gl.constexpr = gl.BlockedLayout([1, 32], [32, 1], [4, 1], [1, 0])  # [E, 32]
        mine = gl.arange(0, _EXPERTS, layout=gl.SliceLayout(1, ROW32))
        heads = gl.arange(0, _ATT // _T, layout=gl.SliceLayout(0, ROW32))
        ma = gl.sum(gl.load(m_ptr + mine[:, None] * (_ATT // _T) + heads[None, :]), axis=1)
        r = _qkv_get(qkv_ptr, _QKV + mine, nprog) / scale_in + ma
        bits = r.to(gl.int32, bitcast=True)
        key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) & -128) | (127 - mine)
        # every key to every thread, 32 at a time, through shared memory (written as one row of 128)
        r_s._reinterpret(gl.int32, [_EXPERTS], gl.SwizzledSharedLayout(1, 1, 1, [0])).store(key)
        gl.thread_barrier()
        _mark(trace, 7, TRACE)
        _mark(trace, 8, TRACE)
        rank = gl.zeros_like(mine)
        for cc in gl.static_range(_EXPERTS // 32):
            k_o = r_s._reinterpret(gl.int32, [_EXPERTS // 32, 32], r_s.type.layout).slice(cc, 1, dim=0).load(ROW32)
            rank += gl.sum((k_o > key[:, None]).to(gl.int32), axis=1)
        SEL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 4], [1, 0])
        j = gl.arange(0, _TOP_K, layout=gl.SliceLayout(1, SEL))
        rank_all = gl.convert_layout(rank, gl.SliceLayout(0, SEL))
        experts = gl.arange(0, _EXPERTS, layout=gl.SliceLayout(0, SEL))
        ids_smem.store(gl.sum(gl.where(rank_all[None, :] == j[:, None], experts[None, :], 0), axis=1))
        return r, rank

    @gluon.jit
    def _route_weights(r, rank, scale, p_ptr):
        """The chosen experts' weights to p_ptr (ranked order): the softmax over them of the logits r (`_top_k`)
        times scale (1 / rms(h)), rounded to bf16 as the model's logits are."""
        r = (r * scale).to(gl.bfloat16).to(gl.float32)
        chosen = rank < _TOP_K
        e = gl.exp(r - gl.max(r, axis=0))
        gl.store(p_ptr + rank, e / gl.sum(gl.where(chosen, e, 0.0), axis=0), mask=chosen)

    @gluon.jit
    def _consumer(ws, bar_ptr, ring, ready, empty, ids_bar, ids_smem, r_s, xs, qs, ps, w_in, w_post, w_q, w_k,
                  k_cache, v_cache, inv_freq, cos_s, sin_s, pos_ptr, slot_ptr, layer_elems, layers, trace_ptr,
                  TRACE: gl.constexpr):
        """Every layer's steps from the ring, a grid barrier between steps (TRACE: the timer at each step's end
        and barrier, `TRACE_MARKS`)."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        flat = xs._reinterpret(gl.bfloat16, [_XS, 8 * _CH], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        ZL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        for i in gl.static_range(_XS // 8):  # the staged inputs' rows 1-7, zero for good
            flat.slice(i * 8, 8, dim=0).store(gl.zeros([8, 8 * _CH], gl.bfloat16, ZL))
        pos = gl.load(pos_ptr).to(gl.int32)
        slot = gl.load(slot_ptr)
        tiles, splits = _splits(pos)
        # The rotary's cos and sin at this position, the same in every layer: once, to shared memory (computed in
        # each layer, libdevice's sin and cos made the layer's code too large for the instruction cache).
        RL: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        d = gl.arange(0, _CH, layout=RL)
        angle = pos.to(gl.float32) * gl.load(inv_freq + d)
        cos_s.store(gl.cos(angle))
        sin_s.store(gl.sin(angle))
        # Launched early (PDL): wait for `_enter_kernel`'s writes (the first layer's input, the barrier's count).
        # The producer reads only what was there before it (weights, the KV of past tokens, positions, table).
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.thread_barrier()
        c = 0
        n = 0
        o_qkv, o_o = ws + _O_QKV_P, ws + _O_O_P
        anchor = _anchor(pid, nprog)
        o_u0, o_u1 = _units(pid, nprog, (_HID // _R) * (_ATT // _T))
        o_gu, o_x = ws + _O_GU_P, ws + _O_X_P
        for layer in range(layers):
            trace = trace_ptr + (layer * nprog + pid) * _MARKS
            if layer > 0:
                n += 1
                _grid_sync(bar_ptr, n * nprog)
            _mark(trace, 0, TRACE)
            # qkv: the layer's input is the stream before it (h) plus the last MoE output; the first layer's is h,
            # the embedding as the host put it there
            c, scale_in = _gemv(o_x, o_qkv, ws + _O_H, 1.0, _QKV_ROWS // _R, _HID, 3, ring, ready,
                                empty, xs, c, pid, nprog, NORM=True, SN=_HID, SKS=_TOP_K * _INTER // _T, SC=_C_X,
                                plain=layer == 0, w_ptr=w_in + layer * _HID, xout_ptr=ws + _O_XIN, WMODE=2,
                                trace=trace, MK=16, TRACE=TRACE)
            n = _step_sync(bar_ptr, n, nprog, trace, 1, TRACE)
            c = _attend(ws, o_qkv, ring, ready, empty, qs, ps, c, pid, nprog, layer, w_q, w_k, k_cache, v_cache,
                        cos_s, sin_s, pos, slot, tiles, splits, layer_elems)
            n = _step_sync(bar_ptr, n, nprog, trace, 3, TRACE)
            # o: its input (the merged heads of its units) staged, then the router's part from a (Ma . a) first and
            # the router's choice, so that the producer streams the experts' tiles while o's tiles are consumed
            _stage_input(ws, ws, 1.0, xs, first=o_u0, KSTEPS=_ATT // _T, NS=_MERGE_UNITS, ACT=2, NORM=False,
                         n=o_u1 - o_u0, SN=0, SKS=0, SC=0, nprog=nprog, plain=False, w_ptr=0, xout_ptr=0, WMODE=0,
                         pid=pid, splits=splits)
            _mark(trace, 20, TRACE)
            c = _router_first(ring, ready, empty, xs, c, anchor, o_u0, ws + _O_M_P, bar_ptr + _ROUTER_COUNT,
                              (layer + 1) * (_R_TILES * (_ATT // _T)))
            r, rank = _top_k(o_qkv, ws + _O_M_P, scale_in, ids_smem, r_s, nprog, trace, TRACE)
            gl.thread_barrier()
            mbarrier.arrive(ids_bar)  # the producer may load the chosen experts' tiles
            _mark(trace, 9, TRACE)
            c, _ = _gemv(ws, o_o, ws, 1.0, _HID // _R, _ATT, 2, ring, ready, empty, xs, c, pid, nprog, splits=splits,
                         STAGE=False, trace=trace, MK=20, TRACE=TRACE)
            n = _step_sync(bar_ptr, n, nprog, trace, 5, TRACE)
            # gate/up's input, norm_post(h) for h = the layer's input + o (program 0 keeps h for the next layer),
            # staged whole in one order: its scale is the same in every program, and the experts' weights need it
            scale = _stage_input(o_o, ws + _O_XIN, 1.0, xs, first=0, KSTEPS=_HID // _T, NS=_HID // _T, ACT=3,
                                 NORM=True, n=0, SN=_HID, SKS=_ATT // _T, SC=_C_O, nprog=nprog, plain=False,
                                 w_ptr=w_post + layer * _HID, xout_ptr=ws + _O_H, WMODE=2, pid=pid, splits=1)
            _mark(trace, 24, TRACE)
            _route_weights(r, rank, scale, ws + _O_P)
            c, _ = _gemv(ws + _O_H, o_gu, ws, scale, _TOP_K * _GU_TILES, _HID, 0, ring, ready, empty, xs, c, pid,
                         nprog, STAGE=False, trace=trace, MK=24, TRACE=TRACE)
            n = _step_sync(bar_ptr, n, nprog, trace, 10, TRACE)
            c, _ = _gemv(o_gu, o_x, ws + _O_P, 1.0, _HID // _R, _TOP_K * _INTER, 1, ring, ready, empty, xs, c, pid,
                         nprog, SN=_TOP_K * 2 * _INTER, SKS=_HID // _T, SC=_C_GU, trace=trace, MK=28, TRACE=TRACE)
            _mark(trace, 12, TRACE)

    @gluon.jit
    def _step_sync(bar_ptr, n, nprog, trace, mark: gl.constexpr, TRACE: gl.constexpr):
        """The grid barrier after a step (the barriers passed so far: n); TRACE: the times of arrival and of
        passing into trace[mark], trace[mark + 1]. Returns n + 1."""
        _mark(trace, mark, TRACE)
        _grid_sync(bar_ptr, (n + 1) * nprog)
        _mark(trace, mark + 1, TRACE)
        return n + 1

    @gluon.jit
    def _stack_kernel(d_qkv, d_o, d_nx, d_ma, d_13, d_2, d_kc, d_vc, ws, bar_ptr, w_in, w_post, w_q, w_k, k_cache,
                      v_cache, inv_freq, pos_ptr, slot_ptr, table_ptr, width, cache_rows, layer_elems, layers,
                      trace_ptr, STAGES: gl.constexpr, CAP: gl.constexpr, CAP_GU: gl.constexpr, BS: gl.constexpr,
                      TRACE: gl.constexpr):
        ring = gl.allocate_shared_memory(d_qkv.dtype, [STAGES, _R, _T], d_qkv.layout)
        # The step's input chunks as wgmma's B operand: [8, 64] tiles, row 0 the input.
        xs = gl.allocate_shared_memory(gl.bfloat16, [_XS, 8, _CH], gl.NVMMASharedLayout.get_default_for([8, _CH],
                                                                                                          gl.bfloat16))
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        ids_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(ids_bar, count=1)
        ids_smem = gl.allocate_shared_memory(gl.int32, [_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        r_s = gl.allocate_shared_memory(gl.float32, [_EXPERTS // 32, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        # The attention's B operands: the group's q (two 64-dim halves) and a tile's P^T.
        qs = gl.allocate_shared_memory(gl.bfloat16, [2, _GRP, _CH],
                                       gl.NVMMASharedLayout.get_default_for([_GRP, _CH], gl.bfloat16))
        ps = gl.allocate_shared_memory(gl.bfloat16, [_GRP, _CT],
                                       gl.NVMMASharedLayout.get_default_for([_GRP, _CT], gl.bfloat16))
        cos_s = gl.allocate_shared_memory(gl.float32, [_CH], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        sin_s = gl.allocate_shared_memory(gl.float32, [_CH], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        gl.warp_specialize([
            (_consumer, (ws, bar_ptr, ring, ready, empty, ids_bar, ids_smem, r_s, xs, qs, ps, w_in, w_post, w_q,
                         w_k, k_cache, v_cache, inv_freq, cos_s, sin_s, pos_ptr, slot_ptr, layer_elems, layers,
                         trace_ptr, TRACE)),
            (_producer, (d_qkv, d_o, d_nx, d_ma, d_13, d_2, d_kc, d_vc, ring, ready, empty, ids_bar, ids_smem, pos_ptr,
                         table_ptr, width, cache_rows, layers, trace_ptr, CAP, CAP_GU, BS, TRACE)),
        ], [1], [48])


def tile_owners(rows: int, ks: int, programs: int, tile_rows: int = ROWS) -> list[tuple[int, int]]:
    """`_owner` on the host: for each row tile of an output of `rows` rows (ks units a tile, split by `_units`
    over `programs`), the first program that writes a partial of it and how many do."""
    total = rows // tile_rows * ks
    n = min(programs, total)

    def owner(u: int) -> int:
        return ((u + 1) * n + total - 1) // total - 1

    return [(owner(t * ks), owner(t * ks + ks - 1) - owner(t * ks) + 1) for t in range(rows // tile_rows)]


def det_slots(rows: int, ks: int, programs: int, tile_rows: int = ROWS) -> int:
    """The most programs that share one of an output's row tiles: the partial slots it needs."""
    return max(count for _, count in tile_owners(rows, ks, programs, tile_rows))


def slot_counts(rows: int, ks: int, programs: int, device) -> torch.Tensor:
    """[rows / ROWS] int32: the partial slots of each row tile of an output (`tile_owners`' counts)."""
    return torch.tensor([count for _, count in tile_owners(rows, ks, programs)], dtype=torch.int32, device=device)


@triton.jit
def _enter_kernel(rows, row, h, bar, N: tl.constexpr, B: tl.constexpr, USE_PDL: tl.constexpr):
    """Before the stack: its input rows[row[0]] ([.., N], any float type: the token's embedding) as float32 to h,
    and its B counts (bar: the grid barrier's and the router units') to 0."""
    pdl_enter(USE_PDL)
    cols = tl.arange(0, N)
    r = tl.load(row).to(tl.int64)
    tl.store(h + cols, tl.load(rows + r * N + cols).to(tl.float32))
    tl.store(bar + cols, 0, mask=cols < B)


@triton.jit
def _exit_kernel(slots, counts, h, w, out, eps, N: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 NORM: tl.constexpr, USE_PDL: tl.constexpr):
    """After the stack: the last layer's output x' = its MoE sum (the C partial slots of N, in slot order below
    each row tile's count, as `_get` reads them) + h. NORM: rounded to out's type, then the model's final
    RMSNorm with weight w (`norm.rms_normed`) to out [N]; else x' to out as float32. R: a row tile's rows."""
    pdl_enter(USE_PDL)
    cols = tl.arange(0, N)
    count = tl.load(counts + cols // R)
    x = tl.load(slots + cols)
    for j in tl.static_range(1, C):
        x += tl.load(slots + j * N + cols, mask=j < count, other=0.0)
    x += tl.load(h + cols)
    if NORM:
        normed = rms_normed(x.to(out.dtype.element_ty), N, eps)
        x = tl.load(w + cols).to(tl.float32) * normed.to(tl.float32)
    tl.store(out + cols, x.to(out.dtype.element_ty))


def fold_router(wr: torch.Tensor, wo: torch.Tensor, w_in: torch.Tensor,
                w_post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's weights folded for the stack, layer by layer (wr [layers * EXPERTS, HID], wo [layers * HID,
    ATT], w_in and w_post [layers, HID] or [layers * HID], bf16): Nx = Wr diag(w_post) / w_in [layers * EXPERTS,
    HID] and Ma = Wr diag(w_post) Wo [layers * EXPERTS, ATT], computed in float32 and rounded to bf16, so that the
    router's logits Wr . norm_post(x + Wo . a) = (Nx . norm_in(x) * rms(x) + Ma . a) / rms(x + Wo . a). Raises
    ValueError where an input-norm weight is zero (Nx is not finite)."""
    layers = wr.shape[0] // EXPERTS
    w_in, w_post = w_in.reshape(-1), w_post.reshape(-1)
    nx = torch.empty_like(wr)
    ma = torch.empty(wr.shape[0], ATT, dtype=wr.dtype, device=wr.device)
    for i in range(layers):
        rows = slice(i * EXPERTS, (i + 1) * EXPERTS)
        n = wr[rows].float() * w_post[i * HID:(i + 1) * HID].float()[None, :]
        ma[rows] = n @ wo[i * HID:(i + 1) * HID].float()
        n = n / w_in[i * HID:(i + 1) * HID].float()[None, :]
        if not torch.isfinite(n).all():
            raise ValueError("the decode stack needs input-norm weights without zeros (it folds the router's "
                             "weights over them)")
        nx[rows] = n
    return nx, ma


def _span(tensors: list[torch.Tensor], cols: int) -> torch.Tensor | None:
    """The 2-D view [rows, cols] over tensors that lie back to back in one storage (each contiguous, in order),
    or None where they do not."""
    first = tensors[0]
    step = first.numel() * first.element_size()
    for i, t in enumerate(tensors):
        if (not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() != first.data_ptr() + i * step):
            return None
    rows = len(tensors) * first.numel() // cols
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (rows, cols), (cols, 1))


class DecodeStack:
    """The host side of `_stack_kernel`: one launch runs a one-token decode step through every decoder layer.

    weights: the layers' qkv, o, router, w13 and w2 as 2-D spans [layers * rows, k]; norms: the input, post-
    attention, q and k norm weights as spans [layers, n] (or flat); inv_freq: the rotary frequencies [HEAD_DIM /
    2] float32.
    The router's weights are read once here, folded (`fold_router`: 75 MB more at 48 layers): the stack does not
    see later changes to them, nor to the o projection's and the norms'.
    `for_model` builds one over a loaded `CausalLM` (whose layers' parameters and KV caches lie back to back per
    name: `CausalLM` and the runner allocate them so), whose `forward` then runs the model's one-request decode
    steps; `reason` first says whether it can take the model at all.
    """

    # The ring's depth, the loads in flight a program, and gate/up's (benchmarks/RESULTS.md, sessions 28 and 30).
    STAGES, CAP, CAP_GU = 10, 2, 3

    def __init__(self, weights: list[torch.Tensor], norms: list[torch.Tensor], inv_freq: torch.Tensor) -> None:
        device = weights[0].device
        self.num_layers = weights[0].shape[0] // QKV
        self.norms, self.inv_freq, self.model = norms, inv_freq, None
        self.programs = torch.cuda.get_device_properties(device).multi_processor_count
        wqkv, wo, wr, w13, w2 = weights
        self.router = fold_router(wr, wo, norms[0], norms[1])
        self.descs = [host_descriptor(w, [ROWS, TILE]) for w in (wqkv, wo, *self.router, w13, w2)]
        for name, rows, ks, slots in DET_OUTPUTS:
            if det_slots(rows, ks, self.programs) > slots:
                raise ValueError(f"{self.programs} programs share a row tile of {name} more than its {slots} slots")
        self.ws = torch.zeros(WS, dtype=torch.float32, device=device)
        self.bar = torch.zeros(COUNTS, dtype=torch.int32, device=device)
        _, rows, ks, _ = DET_OUTPUTS[-1]
        self.x_counts = slot_counts(rows, ks, self.programs, device)
        self.row0 = torch.zeros(1, dtype=torch.int64, device=device)  # `launch`'s x0 as a table of one row
        self.pdl = pdl_supported(device)
        self.kv: tuple | None = None

    @classmethod
    def for_model(cls, model) -> DecodeStack:
        """The stack over a loaded model's layers and bound KV caches (check `reason` first). Raises ValueError
        where the layers' weights or caches do not lie back to back."""
        layers = list(model.model.layers)
        attn = [layer.self_attn for layer in layers]
        moe = [layer.ffn for layer in layers]
        weights = [_span(ts, cols) for ts, cols in (
            ([a.qkv_proj.weight for a in attn], HID), ([a.o_proj.weight for a in attn], ATT),
            ([m.gate.weight for m in moe], HID), ([m.w13 for m in moe], HID), ([m.w2 for m in moe], INTER))]
        norms = [_span(ts, ts[0].numel()) for ts in (
            [layer.input_layernorm.weight for layer in layers],
            [layer.post_attention_layernorm.weight for layer in layers],
            [a.q_norm.weight for a in attn], [a.k_norm.weight for a in attn])]
        if any(t is None for t in weights + norms):
            raise ValueError("the decode stack needs each weight's layers back to back in one tensor")
        stack = cls(weights, norms, model.rotary_emb.inv_freq)
        stack.model = model
        cols = KV_HEADS * HEAD_DIM
        k_all, v_all = _span([a.k_cache for a in attn], cols), _span([a.v_cache for a in attn], cols)
        if k_all is None or v_all is None:
            raise ValueError("the decode stack needs the layers' KV caches back to back in one tensor")
        stack.bind_kv(k_all, v_all, attn[0].k_cache.shape[1])
        return stack

    @staticmethod
    def reason(model, block_size: int) -> str | None:
        """Why `DecodeStack` cannot run this model's batch-1 decode steps, or None when it can."""
        from moeserve.layers.attention import GQAAttention
        from moeserve.moe.dispatcher import LocalDispatcher
        from moeserve.moe.layer import MoELayer

        c, ctx = model.config, model.ctx
        problem = gluon_platform_problem(ctx.device, "the decode stack")
        if problem is not None:
            return problem
        programs = torch.cuda.get_device_properties(ctx.device).multi_processor_count
        rope = model.rotary_emb
        shape = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts, c.top_k,
                 c.moe_intermediate_size)
        rules = (  # (broken, what is allowed)
            (type(model).__name__ != "Qwen3MoeForCausalLM", "Qwen3-MoE models only"),
            (shape != (HID, Q_HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, INTER),
             f"the shape hidden, heads, kv heads, head dim, experts, top-k, expert intermediate = "
             f"{(HID, Q_HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, INTER)} only, not {shape}"),
            (ctx.dtype != torch.bfloat16, "bfloat16 weights only"),
            (c.rms_norm_eps != EPS, f"RMSNorm eps {EPS} only"),
            (not all(isinstance(layer.self_attn, GQAAttention) and layer.self_attn.q_norm is not None
                     and layer.self_attn.qkv_proj.bias is None and layer.self_attn.o_proj.bias is None
                     and isinstance(layer.ffn, MoELayer) and layer.ffn.shared_name is None
                     and layer.ffn.gate.weight.dtype == torch.bfloat16 for layer in model.model.layers),
             "every layer GQA with q/k norms and no biases, and MoE without shared experts"),
            (not (c.norm_topk_prob and c.scoring_func == "softmax" and c.topk_method == "greedy"
                  and c.routed_scaling_factor == 1.0), "softmax routing renormalised over the top-k only"),
            (not isinstance(ctx.dispatcher, LocalDispatcher) or ctx.dispatcher.num_local_slots != c.num_experts,
             "every expert on this GPU (no expert parallelism)"),
            (rope.interleaved or rope.attention_factor != 1.0 or rope.inv_freq.numel() * 2 != HEAD_DIM,
             "rotary embedding over the whole head, not interleaved, without an attention factor"),
            (block_size not in (8, 16, 32, 64), f"KV block sizes 8, 16, 32 or 64 only, not {block_size}"),
            (not MIN_PROGRAMS <= programs <= 144, f"128 to 144 multiprocessors only, not {programs}"),
        )
        broken = [allowed for bad, allowed in rules if bad]
        return "; ".join(broken) if broken else None

    def takes(self, batch) -> bool:
        """Whether this batch runs here: one decode token, no expert-load recording, no hook on any router."""
        from moeserve.forward_batch import ForwardMode

        return (batch.mode == ForwardMode.DECODE and batch.num_tokens == 1 and batch.attn is not None
                and "expert_load" not in batch.extras
                and not any(layer.ffn.gate.observed for layer in self.model.model.layers))

    def bind_kv(self, k_all: torch.Tensor, v_all: torch.Tensor, block_size: int) -> None:
        """The KV caches: k_all, v_all [layers * blocks * block_size, KV_HEADS * HEAD_DIM] (a layer's blocks of
        block_size tokens after the layer before's, as the engine's [blocks, block_size, kv heads, dim] caches
        lie)."""
        descs = [host_descriptor(t, [block_size, TILE], layout_of=[ROWS, TILE]) for t in (k_all, v_all)]  # pages
        rows = k_all.shape[0] // self.num_layers
        self.kv = (descs, k_all, v_all, rows, rows * k_all.shape[1], block_size)

    def launch(self, x0: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, table: torch.Tensor,
               trace: torch.Tensor | None = None) -> torch.Tensor:
        """Run every layer on the token embedded as x0 [HID] at positions[0] (int64, its past tokens: that many),
        its K and V stored at slot_mapping[0] (int64) of the caches, whose pages are table[0] (int32). Returns the
        residual stream after the last layer, float32 [HID] (the final norm's input). trace: int64 [layers,
        programs, MARKS] for the GPU timer at `TRACE_MARKS`."""
        self._run(x0.reshape(1, HID), self.row0, positions, slot_mapping, table, trace)
        return self._exit(torch.empty(HID, dtype=torch.float32, device=x0.device))

    def forward(self, batch) -> torch.Tensor:
        """The final-normed hidden state [1, hidden] of the model's batch that `takes` (model dtype)."""
        model = self.model
        self._run(model.model.embed_tokens.weight, batch.input_ids, batch.positions, batch.attn.slot_mapping,
                  batch.attn.block_tables)
        norm = model.model.norm
        out = torch.empty(1, HID, dtype=torch.promote_types(norm.weight.dtype, model.ctx.dtype),
                          device=self.ws.device)
        return self._exit(out, norm)

    def _run(self, rows: torch.Tensor, row: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
             table: torch.Tensor, trace: torch.Tensor | None = None) -> None:
        """`launch` on the input rows[row[0]] (rows [.., HID]: the embedding table and the token): two launches,
        `_enter_kernel` then the stack, each started early (PDL) where the GPU can."""
        (d_kc, d_vc), k_all, v_all, cache_rows, layer_elems, bs = self.kv
        _enter_kernel[(1,)](rows, row, self.ws[OFFS["h"]:], self.bar, N=HID, B=COUNTS,
                            **launch_kwargs(self.ws.device))
        _stack_kernel[(self.programs,)](
            *self.descs, d_kc, d_vc, self.ws, self.bar, *self.norms, k_all, v_all, self.inv_freq, positions,
            slot_mapping, table, table.shape[-1], cache_rows, layer_elems, self.num_layers,
            self.bar if trace is None else trace, STAGES=self.STAGES, CAP=self.CAP, CAP_GU=self.CAP_GU, BS=bs,
            TRACE=trace is not None, num_warps=4, launch_pdl=self.pdl)

    def _exit(self, out: torch.Tensor, norm=None) -> torch.Tensor:
        """The last layer's output (`_exit_kernel`) to out [.., HID]: normed by norm (an RMSNorm module) in out's
        type, or without a norm as float32."""
        w, eps = (norm.weight, norm.eps) if norm is not None else (self.ws, 0.0)
        _exit_kernel[(1,)](self.ws[OFFS["x_p"]:], self.x_counts, self.ws[OFFS["h"]:], w, out, eps, N=HID, R=ROWS,
                           C=DET_OUTPUTS[-1][3], NORM=norm is not None, num_warps=8, **launch_kwargs(out.device))
        return out
