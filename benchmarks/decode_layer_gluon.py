"""`decode_layer_probe.py`'s layer as one persistent, warp-specialised Gluon kernel whose weight loads never wait
for the data.

In each program a producer warp streams the program's weight tiles of every step, layer after layer, by TMA
into a ring of shared-memory stages, as far ahead as the ring reaches. It waits only for a free stage, and
before the experts' tiles for the router's choice. The consumer warps (one warpgroup, or two taking alternate
stages) compute each step's GEMV on CUDA cores from the ring once the step's input is whole (the same grid
barriers as the Triton probe's persistent kernel). So the weight stream runs through the barriers and the small
steps, up to the ring's depth (stages x 16 KB a multiprocessor), where the Triton kernels' loads start only after
each barrier. Same steps, work split, workspace and results as `decode_layer_probe`; Triton 3.6's Gluon, Hopper.

With MMA (`run(mma=True)`) one consumer warpgroup runs the GEMVs on the tensor cores: after each barrier it stages
the step's input (its units' k steps, or all of them) once in shared memory as bf16, row 0 of [8, 64] tiles whose
other rows stay zero, and each unit is wgmma m64n8 of the ring's weight tile against them; a norm comes from the
values staged. Options, each measured (benchmarks/RESULTS.md, "Engine on one H100 / Session 28"): the router's
choice by ranks, handed to the producer in shared memory (`fast`); side buffers that load the next layer's first
qkv tiles while the producer waits for the router (`side`); barriers polled by loads (`poll`); gate/up's units
drawn from a counter (`drawn`); at most `cap` loads in flight a program. The best found: 64 x 128 tiles, fast,
10 stages, cap 2 (49.3 µs a layer against 59.5 for the CUDA-core consumers). Closer to the real layer: real GQA
attention whose past K and V stream through the ring like weights (`attention`, `_attend`), sums in a fixed order
(`det`, `_flush` / `_get`), and a whole Qwen3-MoE layer (`full`).
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_layer_probe import (  # noqa: E402
    ATT,
    ATT_UNITS,
    CHUNK_TOKENS,
    CONTEXT,
    DET_OUTPUTS,
    EPS,
    EXPERTS,
    HEAD_DIM,
    HID,
    INTER,
    KV_HEADS,
    KVS,
    OFFS,
    QKV,
    ROPE_THETA,
    TOP_K,
    WS,
)

from moeserve.kernels.decode_stack_gluon import (  # noqa: E402  (the engine's kernel; its trace marks are ours)
    MARKS,
    TRACE_MARKS,
    _mark,
    _owner,
    _scores,
    _stage_slots,
    _stage_store,
    _store_partial,
    _units,
    _values,
    tile_owners,
)
from moeserve.kernels.decode_stack_gluon import _get as _slots_get  # noqa: E402
from moeserve.kernels.decode_stack_gluon import _norm_rope as _head_norm_rope  # noqa: E402
from moeserve.kernels.decode_stack_gluon import det_slots as _det_slots  # noqa: E402
from moeserve.kernels.gluon_support import (  # noqa: E402
    fence_async_shared,
    gl,
    gluon,
    host_descriptor,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# A ring stage: 64 weight rows x 128 k (256-byte row segments, which HBM serves faster: benchmarks/RESULTS.md,
# session 27), or with DECODE_RING_TILE=128x64 128 rows x 64 k (sessions 27-28's first figures). 16 KB of bf16.
ROWS, TILE = (128, 64) if os.environ.get("DECODE_RING_TILE") == "128x64" else (64, 128)
CHUNK = 64  # MMA consumers: the input is staged in chunks of 64 values, each the B operand of one k-64 wgmma
XS = 32  # chunks staged at most (a program's units of a step must fit, or the step's whole input)
DRAW = 8  # `run(drawn=True)`: gate/up's largest draw, in units

if gluon is not None:
    _HID, _QKV, _KVS, _ATT = gl.constexpr(HID), gl.constexpr(QKV), gl.constexpr(KVS), gl.constexpr(ATT)
    _EXPERTS, _TOP_K, _INTER = gl.constexpr(EXPERTS), gl.constexpr(TOP_K), gl.constexpr(INTER)
    _T, _R = gl.constexpr(TILE), gl.constexpr(ROWS)
    # The workspace's float offsets (`decode_layer_probe.OFFS`).
    _O_A, _O_O, _O_R = gl.constexpr(OFFS["a"]), gl.constexpr(OFFS["o"]), gl.constexpr(OFFS["r"])
    _O_GU, _O_X = gl.constexpr(OFFS["gu"]), gl.constexpr(OFFS["x"])
    _O_XIN, _O_H = gl.constexpr(OFFS["xin"]), gl.constexpr(OFFS["h"])  # FULL: the residual stream
    _O_IDS, _O_P, _WS = gl.constexpr(OFFS["ids"]), gl.constexpr(OFFS["p"]), gl.constexpr(WS)
    _O_AM, _O_AL, _O_AO = gl.constexpr(OFFS["am"]), gl.constexpr(OFFS["al"]), gl.constexpr(OFFS["ao"])
    # `run(det=True)`: each step's partial slots (`decode_layer_probe.DET_OUTPUTS`)
    _O_QKV_P, _O_A_P, _O_O_P = gl.constexpr(OFFS["qkv_p"]), gl.constexpr(OFFS["a_p"]), gl.constexpr(OFFS["o_p"])
    _O_R_P, _O_GU_P, _O_X_P = gl.constexpr(OFFS["r_p"]), gl.constexpr(OFFS["gu_p"]), gl.constexpr(OFFS["x_p"])
    _C_QKV, _C_A, _C_O, _C_R, _C_GU, _C_X = (gl.constexpr(slots) for _, _, slots in DET_OUTPUTS)
    _CTX, _KVH, _HD = gl.constexpr(CONTEXT), gl.constexpr(KV_HEADS), gl.constexpr(HEAD_DIM)
    _CT = gl.constexpr(CHUNK_TOKENS)
    _AU, _CPH = gl.constexpr(ATT_UNITS), gl.constexpr(CONTEXT // CHUNK_TOKENS)  # units; chunks a kv head
    _GRP = gl.constexpr(ATT // HEAD_DIM // KV_HEADS)  # query heads a kv head (8: wgmma's N)
    _SM_SCALE = gl.constexpr(HEAD_DIM ** -0.5)
    _EPS, _LOG_THETA = gl.constexpr(EPS), gl.constexpr(math.log(ROPE_THETA))
    _MERGE_UNITS = gl.constexpr(8)  # the o step's units a program has, at most, with real attention
    _MERGE_BATCH = gl.constexpr(int(os.environ.get('DECODE_MERGE_BATCH', '8')))  # chunks merged a loop step
    # An expert's row tiles in gate/up (gate's rows, then up's) and k steps in down.
    _GU_TILES = gl.constexpr(2 * INTER // ROWS)
    _DN_STEPS = gl.constexpr(INTER // TILE)
    _XS = gl.constexpr(XS)
    _CH = gl.constexpr(CHUNK)
    _HK = gl.constexpr(TILE // CHUNK)  # staged chunks a unit
    _HM = gl.constexpr(ROWS // 64)  # 64-row MMA halves a unit
    _MARKS = gl.constexpr(MARKS)
    _ACC_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]))
    _DRAW = gl.constexpr(DRAW)
    _IDS_L = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # the producer warp's copy of the choice

    @gluon.jit
    def _get(buf, idx, DET: gl.constexpr, N: gl.constexpr = 0, KS: gl.constexpr = 0, C: gl.constexpr = 0, nprog=1,
             plain=False):
        """Values idx of a step's output: buf[idx], or with DET (fixed-order sums) the sum of its partial slots
        buf[j * N + idx] in slot order, j below the count of programs that wrote row idx's tile (the output has N
        rows in tiles of ROWS, each KS units; C slots at most). plain: buf holds plain values (the first layer's
        input)."""
        if DET:
            if plain:
                x = gl.load(buf + idx)
            else:  # the engine kernel's (64-row tiles: `run`)
                x = _slots_get(buf, idx, N, KS, C, nprog)
        else:
            x = gl.load(buf + idx)
        return x

    @gluon.jit
    def _issue(desc, row, col, ring, ready, empty, c, LOAD: gl.constexpr, SIDE: gl.constexpr = 0,
               CAP: gl.constexpr = 0):
        """Producer: the [128, 64] weight tile at (row, col) into ring stage c % STAGES once it is free (the
        ring's first STAGES buffers; SIDE more follow, `_produce_side`). CAP: also once the tile CAP before has
        arrived, so that at most CAP of the program's loads are in flight. For timing the consumers alone, LOAD
        0 only marks the stage ready, and LOAD 2 does nothing (the consumers then skip the handshakes too,
        `_take`)."""
        STAGES: gl.constexpr = ring.type.shape[0] - SIDE
        if CAP:
            if c >= CAP:
                mbarrier.wait(ready.index((c - CAP) % STAGES), ((c - CAP) // STAGES) & 1)
        _issue_at(desc, row, col, ring, ready, empty, c % STAGES, (c // STAGES) & 1, LOAD)
        return c + 1

    @gluon.jit
    def _issue_at(desc, row, col, ring, ready, empty, s, phase, LOAD: gl.constexpr):
        """`_issue` into buffer s, whose fill of this phase (0 or 1) this is."""
        if LOAD != 2:
            # A fresh barrier counts as having completed the phase before phase 0: round 0 passes at once.
            mbarrier.wait(empty.index(s), phase ^ 1)
        if LOAD == 1:
            mbarrier.expect(ready.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [row, col], ready.index(s), ring.index(s))
        elif LOAD == 0:
            mbarrier.arrive(ready.index(s))

    @gluon.jit
    def _expert(ids, j, FAST: gl.constexpr):
        """The router's j-th choice: from ids, the [TOP_K] int32 choice in registers (FAST, `_ids_in`), or the
        workspace (a pointer to floats)."""
        if FAST:
            e = gl.sum(gl.where(gl.arange(0, _TOP_K, layout=_IDS_L) == j, ids, 0), axis=0)
        else:
            e = gl.load(ids + j).to(gl.int32)
        return e

    @gluon.jit
    def _side_units(pid, nprog, SIDE: gl.constexpr):
        """The program's qkv units that go through the side buffers (`_produce_side`): its first min(SIDE, n)."""
        u0, u1 = _units(pid, nprog, (_QKV // _R) * (_HID // _T))
        return gl.minimum(u1 - u0, SIDE)

    @gluon.jit
    def _produce_side(desc, layer, ring, ready, empty, pid, nprog, LOAD: gl.constexpr, SIDE: gl.constexpr):
        """Producer: the program's first SIDE qkv units of `layer` into the SIDE buffers after the ring's STAGES,
        one fill a layer. Issued while the producer would otherwise wait for the router's choice (the layer
        before's), so HBM streams the next layer's first tiles through that gap."""
        STAGES: gl.constexpr = ring.type.shape[0] - SIDE
        KSTEPS: gl.constexpr = _HID // _T
        u0, u1 = _units(pid, nprog, (_QKV // _R) * KSTEPS)
        for i in range(_side_units(pid, nprog, SIDE)):
            u = u0 + i
            _issue_at(desc, layer * _QKV + (u // KSTEPS) * _R, (u % KSTEPS) * _T, ring, ready, empty, STAGES + i,
                      layer & 1, LOAD)

    @gluon.jit
    def _produce_attn(d_kc, d_vc, layer, ring, ready, empty, c, pid, nprog, LOAD: gl.constexpr, SIDE: gl.constexpr,
                      CAP: gl.constexpr):
        """Producer, real attention: each of the program's (kv head, 64-token chunk) units as its K tile, then its
        V tile ([64 tokens, 128] each, one ring stage). The past tokens' cache does not depend on the layer's qkv,
        so these stream ahead of it like weights."""
        u0, u1 = _units(pid, nprog, _AU)
        for u in range(u0, u1):
            row = (layer * _KVH + u // _CPH) * (_CTX + 1) + (u % _CPH) * _CT  # CONTEXT + 1 rows a head
            c = _issue(d_kc, row, 0, ring, ready, empty, c, LOAD, SIDE, CAP)
            c = _issue(d_vc, row, 0, ring, ready, empty, c, LOAD, SIDE, CAP)
        return c

    @gluon.jit
    def _produce_dense(desc, row0, N_TILES: gl.constexpr, KSTEPS: gl.constexpr, ring, ready, empty, c, pid, nprog,
                       LOAD: gl.constexpr, ids=None, EXPERT_TILES: gl.constexpr = 0, skip=0, FAST: gl.constexpr = False,
                       SIDE: gl.constexpr = 0, CAP: gl.constexpr = 0):
        """The program's units of a GEMV over desc's rows from row0, a row tile's k steps in turn, but for its first
        `skip` (loaded already, `_produce_side`). EXPERT_TILES: the rows are experts of EXPERT_TILES row tiles
        each, and row tile t is tile t % EXPERT_TILES of expert ids[t // EXPERT_TILES] (gate/up over the chosen
        experts, as `decode_layer_probe._gemv`; `_expert`)."""
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        for u in range(u0 + skip, u1):
            t = u // KSTEPS
            if EXPERT_TILES:
                e = _expert(ids, t // EXPERT_TILES, FAST)
                row = row0 + e * (EXPERT_TILES * _R) + (t % EXPERT_TILES) * _R
            else:
                row = row0 + t * _R
            c = _issue(desc, row, (u % KSTEPS) * _T, ring, ready, empty, c, LOAD, SIDE, CAP)
        return c

    @gluon.jit
    def _producer(d_qkv, d_kv, d_o, d_r, d_13, d_2, d_kc, d_vc, ws_ptr, ring, ready, empty, ids_bar, ids_smem, codes,
                  cnt_ptr, trace_ptr, layers, MOE_ONLY: gl.constexpr, LOAD: gl.constexpr, TRACE: gl.constexpr,
                  FAST: gl.constexpr, SIDE: gl.constexpr, DRAWN: gl.constexpr, CAP: gl.constexpr,
                  ATTN: gl.constexpr):
        """Every step's weight tiles, layer after layer, into the ring; before the gate/up tiles, the router's
        choice (FAST: from ids_smem). SIDE: each layer's first qkv tiles go to the side buffers, loaded while the
        layer before waits for its router's choice (`_produce_side`). DRAWN: gate/up's units drawn from a counter a
        layer (`_produce_drawn`). CAP: at most CAP loads in flight (`_issue`). ATTN: the KV cache's tiles rather
        than the stand-in GEMV's weights (`_produce_attn`)."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        c = 0
        skip = 0
        if SIDE:
            skip = _side_units(pid, nprog, SIDE)
            _produce_side(d_qkv, 0, ring, ready, empty, pid, nprog, LOAD, SIDE)
        for layer in range(layers):
            ids = ws_ptr + layer * _WS + _O_IDS
            if not MOE_ONLY:
                c = _produce_dense(d_qkv, layer * _QKV, _QKV // _R, _HID // _T, ring, ready, empty, c, pid, nprog,
                                   LOAD, skip=skip, SIDE=SIDE, CAP=CAP)
                if ATTN:
                    c = _produce_attn(d_kc, d_vc, layer, ring, ready, empty, c, pid, nprog, LOAD, SIDE, CAP)
                else:
                    c = _produce_dense(d_kv, layer * _ATT, _ATT // _R, _KVS // _T, ring, ready, empty, c, pid,
                                       nprog, LOAD, SIDE=SIDE, CAP=CAP)
                c = _produce_dense(d_o, layer * _HID, _HID // _R, _ATT // _T, ring, ready, empty, c, pid, nprog,
                                   LOAD, SIDE=SIDE, CAP=CAP)
                c = _produce_dense(d_r, layer * _EXPERTS, _EXPERTS // _R, _HID // _T, ring, ready, empty, c, pid,
                                   nprog, LOAD, SIDE=SIDE, CAP=CAP)
            if SIDE:
                if layer + 1 < layers:
                    _produce_side(d_qkv, layer + 1, ring, ready, empty, pid, nprog, LOAD, SIDE)
            trace = trace_ptr + (layer * nprog + pid) * _MARKS
            _mark(trace, 13, TRACE)
            mbarrier.wait(ids_bar, layer & 1)  # this program's consumers have stored the router's choice
            _mark(trace, 14, TRACE)
            if FAST:
                ids = ids_smem.load(_IDS_L)
            if DRAWN:
                c = _produce_drawn(d_13, layer * _EXPERTS * 2 * _INTER, ids, cnt_ptr + layer, nprog, ring, ready,
                                   empty, codes, c, LOAD, FAST)
            else:
                c = _produce_dense(d_13, layer * _EXPERTS * 2 * _INTER, _TOP_K * _GU_TILES, _HID // _T, ring, ready,
                                   empty, c, pid, nprog, LOAD, ids, _GU_TILES, FAST=FAST, SIDE=SIDE, CAP=CAP)
            KD: gl.constexpr = _TOP_K * _DN_STEPS
            u0, u1 = _units(pid, nprog, (_HID // _R) * KD)
            for u in range(u0, u1):
                ks = u % KD
                e = _expert(ids, ks // _DN_STEPS, FAST)
                row = (layer * _EXPERTS + e) * _HID + (u // KD) * _R
                c = _issue(d_2, row, (ks % _DN_STEPS) * _T, ring, ready, empty, c, LOAD, SIDE, CAP)

    @gluon.jit
    def _grid_arrive(bar_ptr):
        gl.thread_barrier()  # every thread's atomics of the step before the (single-thread) release
        gl.atomic_add(bar_ptr, 1, sem="release")

    @gluon.jit
    def _grid_wait(bar_ptr, target, POLL: gl.constexpr = False):
        """Spin on the count with acquire reads (polling by volatile loads, then one acquire, took 1-2% longer with
        CUDA-core consumers). POLL: by volatile loads, then one acquire."""
        if POLL:
            while gl.load(bar_ptr, volatile=True) < target:
                pass
            gl.atomic_add(bar_ptr, 0, sem="acquire")
        else:
            while gl.atomic_add(bar_ptr, 0, sem="acquire") < target:
                pass
        gl.thread_barrier()

    @gluon.jit
    def _scale(x_ptr, NORM: gl.constexpr):
        """1 / rms(x[:HID]), or 1 without NORM (timing only)."""
        if NORM:
            scale = _inv_rms(x_ptr)
        else:
            scale = 1.0
        return scale

    @gluon.jit
    def _inv_rms(x_ptr):
        lay: gl.constexpr = gl.BlockedLayout([_HID // 128], [32], [4], [0])
        x = gl.load(x_ptr + gl.arange(0, _HID, layout=lay), cache_modifier=".cg")
        return 1.0 / gl.sqrt(gl.sum(x * x, axis=0) / _HID + 1e-6)

    @gluon.jit
    def _take(ring, ready, empty, c, layout: gl.constexpr, BAR: gl.constexpr = True, SYNCED: gl.constexpr = True):
        """Consumer: stage c's tile as fp32 registers; the stage is released once every warp has read it. For
        timing only (nothing overwrites the stage): BAR False skips that barrier, SYNCED False the handshakes."""
        STAGES: gl.constexpr = ring.type.shape[0]
        s = c % STAGES
        if SYNCED:
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
        w = ring.index(s).load(layout).to(gl.float32)
        if BAR:
            gl.thread_barrier()
        if SYNCED:
            mbarrier.arrive(empty.index(s))
        return w

    @gluon.jit
    def _x_chunk(x_ptr, p_ptr, ks, cols, ACT: gl.constexpr, DET: gl.constexpr = False, SN: gl.constexpr = 0,
                 SKS: gl.constexpr = 0, SC: gl.constexpr = 0, nprog=1, plain=False):
        """The input's values at k step ks, columns cols: x[ks * TILE + cols]; with ACT 1 (down, x_ptr: the gate/up
        sums) silu(g) * u * p of expert ks // DN_STEPS's channels; with ACT 2 (o after real attention, x_ptr: the
        layer's workspace) the attention output, merged from its chunks' partials (`_attend`); with ACT 3 (a
        whole layer's residual stream) x_ptr's values plus p_ptr's (plain: p_ptr's only). DET: x_ptr holds
        the producing step's partial slots (SN rows, SKS units a tile, SC slots; `_get`)."""
        if ACT == 1:
            j = ks // _DN_STEPS
            ch = (ks % _DN_STEPS) * _T + cols
            g = _get(x_ptr, j * 2 * _INTER + ch, DET, SN, SKS, SC, nprog)
            up = _get(x_ptr, j * 2 * _INTER + _INTER + ch, DET, SN, SKS, SC, nprog)
            x = g / (1.0 + gl.exp(-g)) * up * gl.load(p_ptr + j)
        elif ACT == 2:
            gl.static_assert(_T == _HD, "a k step is one query head's output")
            head = ks  # query head, a value a row; cols: its dims
            first = (head // _GRP) * _CPH * _GRP + head % _GRP  # its partials: (unit * GRP + head in group)
            top = gl.load(x_ptr + _O_AM + first)
            for cc in gl.static_range(1, _CPH):
                top = gl.maximum(top, gl.load(x_ptr + _O_AM + first + cc * _GRP))
            num = gl.zeros_like(cols.to(gl.float32))
            den = gl.zeros_like(top)
            for c4 in range(0, _CPH, _MERGE_BATCH):  # chunks' loads in batches: all 16 at once spill
                for cc in gl.static_range(_MERGE_BATCH):
                    i = first + (c4 + cc) * _GRP
                    w = gl.exp(gl.load(x_ptr + _O_AM + i) - top)
                    num += w * gl.load(x_ptr + _O_AO + i * _HD + cols)
                    den += w * gl.load(x_ptr + _O_AL + i)
            x = num / den
        elif ACT == 3:  # a whole layer's residual stream: x_ptr's sums (a step's output) plus p_ptr's values
            if plain:  # the first layer's input
                x = gl.load(p_ptr + ks * _T + cols)
            else:
                x = _get(x_ptr, ks * _T + cols, DET, SN, SKS, SC, nprog) + gl.load(p_ptr + ks * _T + cols)
        else:
            x = _get(x_ptr, ks * _T + cols, DET, SN, SKS, SC, nprog, plain)
        return x

    @gluon.jit
    def _consume(x_ptr, y_ptr, p_ptr, scale, N_TILES: gl.constexpr, K: gl.constexpr, ACT: gl.constexpr, ring,
                 ready, empty, c, pid, nprog, COMPUTE: gl.constexpr, WG: gl.constexpr, NWG: gl.constexpr):
        """y[t * 128 + i] += scale * sum_k W[tile t's row i, k] x[k] over the program's units; of NWG consumer
        warpgroups, warpgroup WG takes every NWG-th ring stage; without COMPUTE it only takes the tiles. Each
        unit's input is loaded a unit ahead (reading each step's input into L1 first moved nothing), the products
        summed in place and reduced once a row tile (or at the warpgroup's last unit of it), then out by atomics.
        Returns the ring count after the step."""
        KSTEPS: gl.constexpr = K // _T
        BL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.arange(0, _T, layout=gl.SliceLayout(0, BL))
        rows = gl.arange(0, _R, layout=gl.SliceLayout(1, BL))
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        first = (WG + NWG - c % NWG) % NWG  # this warpgroup's first unit: ring stage c + first has its parity
        if COMPUTE:
            # Timing ablations (only with the producer's LOAD off): COMPUTE 2 and 4 skip _take's barrier, 3 and 4
            # the input's loads, 5 (with LOAD 2) the stage handshakes and the input's loads, 6 also each step's
            # own work outside the tiles (`_consumer`).
            BAR: gl.constexpr = COMPUTE % 2 == 1
            SYNCED: gl.constexpr = COMPUTE < 5
            acc = gl.zeros([_R, _T], gl.float32, BL)
            xk = _x_chunk(x_ptr, p_ptr, (u0 + first) % KSTEPS, cols, ACT)
            for i in range(first, u1 - u0, NWG):
                u = u0 + i
                t = u // KSTEPS
                nxt = u + NWG
                if COMPUTE >= 3:
                    xn = xk
                else:
                    xn = _x_chunk(x_ptr, p_ptr, gl.minimum(nxt, u1 - 1) % KSTEPS, cols, ACT)
                acc += _take(ring, ready, empty, c + i, BL, BAR, SYNCED) * xk[None, :]
                if (nxt // KSTEPS != t) | (nxt >= u1):
                    gl.atomic_add(y_ptr + t * _R + rows, gl.sum(acc, axis=1) * scale, sem="relaxed")
                    acc = gl.zeros([_R, _T], gl.float32, BL)
                xk = xn
        else:  # only take the tiles: the ring's own rate
            for i in range(first, u1 - u0, NWG):
                _take(ring, ready, empty, c + i, BL)
        return c + (u1 - u0)

    @gluon.jit
    def _consume_mma(x_ptr, y_ptr, p_ptr, scale, N_TILES: gl.constexpr, K: gl.constexpr, ACT: gl.constexpr, ring,
                     ready, empty, xs, c, pid, nprog, SIDE: gl.constexpr, layer, SIDE_UNITS: gl.constexpr,
                     NORM: gl.constexpr, DET: gl.constexpr, SN: gl.constexpr, SKS: gl.constexpr, SC: gl.constexpr,
                     plain, w_ptr, xout_ptr, WMODE: gl.constexpr):
        """`_consume` on the tensor cores (one consumer warpgroup): the step's input chunks of the program's units
        are loaded at once, scaled, rounded to bf16 and staged as row 0 of [8, 64] tiles in shared memory (rows
        1-7 stay zero), then each unit is two wgmma m64n8 over the ring stage's two 64-row halves, the next
        unit's issued before the last one's are waited for. Column 0 of the [64, 8] sums is the rows' result.
        NORM: the input's rms norm from the staged values (`_stage_input`). DET: fixed-order sums, the input from
        its partial slots (SN, SKS, SC: `_get`; plain: it has none) and the output to this program's (`_flush`).
        w_ptr, xout_ptr, WMODE: a norm's weight and the residual's store (`_stage_input`). Returns the ring count
        and the scale."""
        STAGES: gl.constexpr = ring.type.shape[0] - SIDE
        KSTEPS: gl.constexpr = K // _T
        # Units' inputs staged; the attention's merge only the units' heads (at most 8 from 128 programs, `run`).
        NS: gl.constexpr = _MERGE_UNITS if ACT == 2 else (KSTEPS if KSTEPS < _XS // _HK else _XS // _HK)
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        n = u1 - u0
        side = 0
        if SIDE_UNITS:  # the first units from the side buffers, filled once a layer
            side = gl.minimum(n, SIDE_UNITS)
        # Stage: slot j holds k step (u0 + j) % KSTEPS, so unit u reads slot (u - u0) % KSTEPS (n <= NS, `run`).
        scale = _stage_input(x_ptr, p_ptr, scale, xs, u0, KSTEPS, NS, ACT, NORM, n, DET, SN, SKS, SC, nprog, plain,
                             w_ptr, xout_ptr, WMODE, pid)
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, _ACC_L))
        acc0 = gl.zeros([64, 8], gl.float32, _ACC_L)
        acc1 = gl.zeros([64, 8], gl.float32, _ACC_L)
        for i in range(n):
            u = u0 + i
            t = u // KSTEPS
            s, phase = _stage_of(c, i, side, layer, STAGES)
            mbarrier.wait(ready.index(s), phase)
            acc0, acc1 = _mma_unit(ring, s, xs, i % KSTEPS, acc0, acc1)
            if i > 0:  # the unit before is done in every warp: its stage is free
                gl.thread_barrier()
                mbarrier.arrive(empty.index(_stage_of(c, i - 1, side, layer, STAGES)[0]))
            if ((u + 1) // KSTEPS != t) | (i + 1 == n):
                acc0, acc1 = _flush(y_ptr, t, rows, acc0, acc1, DET, N_TILES * _R, KSTEPS, pid, nprog)
        if n > 0:
            gl.thread_barrier()
            mbarrier.arrive(empty.index(_stage_of(c, n - 1, side, layer, STAGES)[0]))
        return c + n - side, scale

    @gluon.jit
    def _norm_rope(a, b, w, d, pos, ROW: gl.constexpr):
        """The engine kernel's per-head norm and rotary (`decode_stack_gluon._norm_rope`) at position pos, its cos
        and sin computed here (pos is read from memory, as an engine's would be. The cross-compile's "spills" on
        these lines are libdevice's sin/cos slow path for huge angles, not taken.)"""
        angle = pos.to(gl.float32) * gl.exp(d.to(gl.float32) * (-2.0 * _LOG_THETA / _HD))
        return _head_norm_rope(a, b, w, d, gl.cos(angle), gl.sin(angle), ROW)

    @gluon.jit
    def _attend(ws, qkv, ring, ready, empty, qs, ps, c, pid, nprog, STAGES: gl.constexpr, DET: gl.constexpr,
                layer=0, w_q=0, w_k=0, k_cache=0, v_cache=0, pos_ptr=0, FULL: gl.constexpr = False):
        """Consumer, real attention over the program's (kv head h, chunk) units, flash-decoding style: S^T = K . q^T
        ([64 tokens, 8 query heads], wgmma with the group's q, scaled by 1/sqrt(d), as the B operand in qs), the
        chunk's softmax by column, O^T = V^T . P^T (V's tile as a transposed A operand, P^T through ps), and the
        chunk's maxima, sums and unnormalised outputs to the workspace (am, al, ao) for the o step to merge
        (`_x_chunk`). The last chunk also takes the new token, whose k and v come from the qkv step (qkv: its
        output, or with DET its partial slots, `_get`). FULL: q and the new k take the per-head norms (w_q, w_k
        of the layer) and rotary embedding at position pos_ptr[0] (CONTEXT) first (`_norm_rope`), and the last
        chunk's program stores the new token's k and v in the cache's row CONTEXT."""
        QL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # [8, 64] q halves
        heads_l: gl.constexpr = gl.SliceLayout(0, _ACC_L)
        dims_l: gl.constexpr = gl.SliceLayout(1, _ACC_L)
        qi = gl.arange(0, _GRP, layout=gl.SliceLayout(1, QL))
        qd = gl.arange(0, _CH, layout=gl.SliceLayout(0, QL))
        heads = gl.arange(0, _GRP, layout=heads_l)
        dims = gl.arange(0, 64, layout=dims_l)
        u0, u1 = _units(pid, nprog, _AU)
        for u in range(u0, u1):
            h = u // _CPH
            last = (u % _CPH) == _CPH - 1
            q_rows = (h * _GRP + qi)[:, None] * _HD
            q0 = _get(qkv, q_rows + qd[None, :], DET, _QKV, _HID // _T, _C_QKV, nprog)
            q1 = _get(qkv, q_rows + _CH + qd[None, :], DET, _QKV, _HID // _T, _C_QKV, nprog)
            k0 = _get(qkv, _ATT + h * _HD + qd, DET, _QKV, _HID // _T, _C_QKV, nprog)
            k1 = _get(qkv, _ATT + h * _HD + _CH + qd, DET, _QKV, _HID // _T, _C_QKV, nprog)
            if FULL:
                pos = gl.load(pos_ptr)
                q0, q1 = _norm_rope(q0, q1, w_q + layer * _HD, qd, pos, True)
                k0, k1 = _norm_rope(k0, k1, w_k + layer * _HD, qd, pos, False)
            q0 = (q0 * _SM_SCALE).to(gl.bfloat16)
            q1 = (q1 * _SM_SCALE).to(gl.bfloat16)
            k0 = k0.to(gl.bfloat16)
            k1 = k1.to(gl.bfloat16)
            qs.index(0).store(q0)
            qs.index(1).store(q1)
            fence_async_shared()
            gl.thread_barrier()
            # The new token's score from the same bf16 values (used by the last chunk only).
            s_new = gl.sum(q0.to(gl.float32) * k0.to(gl.float32)[None, :], axis=1)
            s_new = gl.convert_layout(s_new + gl.sum(q1.to(gl.float32) * k1.to(gl.float32)[None, :], axis=1),
                                      heads_l)
            acc = _scores(ring, ready, empty, c, qs, STAGES)  # S^T = K . q^T (the engine kernel's)
            top = gl.max(acc, axis=0)
            top = gl.where(last, gl.maximum(top, s_new), top)
            p = gl.exp(acc - top[None, :])
            p_new = gl.where(last, gl.exp(s_new - top), 0.0)
            total = gl.sum(p, axis=0) + p_new
            # O^T = V^T . P^T, in two 64-dim halves (the engine kernel's)
            o0, o1 = _values(ring, ready, empty, c + 1, STAGES, ps, p, gl.zeros([64, _GRP], gl.float32, _ACC_L),
                             gl.zeros([64, _GRP], gl.float32, _ACC_L))
            c += 2
            v_new = _ATT + _KVH * _HD + h * _HD
            v0 = _get(qkv, v_new + dims, DET, _QKV, _HID // _T, _C_QKV, nprog)
            v1 = _get(qkv, v_new + 64 + dims, DET, _QKV, _HID // _T, _C_QKV, nprog)
            if FULL:  # the new token's k and v into the cache, for the next step
                if last:
                    row = ((layer * _KVH + h) * (_CTX + 1) + pos) * _HD
                    gl.store(k_cache + row + qd, k0)
                    gl.store(k_cache + row + _CH + qd, k1)
                    gl.store(v_cache + row + dims, v0.to(gl.bfloat16))
                    gl.store(v_cache + row + 64 + dims, v1.to(gl.bfloat16))
            o0 += v0.to(gl.bfloat16).to(gl.float32)[:, None] * p_new[None, :]
            o1 += v1.to(gl.bfloat16).to(gl.float32)[:, None] * p_new[None, :]
            _store_partial(ws + _O_AM, ws + _O_AL, ws + _O_AO, u * _GRP + heads, dims, top, total, o0, o1)
        return c

    @gluon.jit
    def _stage_input(x_ptr, p_ptr, scale, xs, first, KSTEPS: gl.constexpr, NS: gl.constexpr, ACT: gl.constexpr,
                     NORM: gl.constexpr = False, n=1 << 30, DET: gl.constexpr = False, SN: gl.constexpr = 0,
                     SKS: gl.constexpr = 0, SC: gl.constexpr = 0, nprog=1, plain=False, w_ptr=0, xout_ptr=0,
                     WMODE: gl.constexpr = 0, pid=0):
        """The MMA consumers' input: unit slot j < NS is k step (first + j) % KSTEPS of the step's input
        (`_x_chunk`) times scale, in bf16, as HK chunks of 64 (slots j * HK ...: row 0 of each [8, 64] tile of
        xs); visible to the next wgmma when this returns. NORM (all k steps staged): scale is 1 / rms of the
        values loaded, so the norm costs no read of its own. Slots from n on (the units the program has) repeat
        slot n - 1's k step: where each value costs 48 loads (ACT 2, the attention's merge), from L1. WMODE 1:
        each value is also multiplied by the norm's weight w_ptr[k]; 2: and program 0 stores the input as loaded
        (the residual stream, for the steps after) to xout_ptr. Returns the scale."""
        ks, col = _stage_slots(first, KSTEPS, NS, n, ACT == 2, _HK)  # the engine kernel's
        x = _x_chunk(x_ptr, p_ptr, ks, col, ACT, DET, SN, SKS, SC, nprog, plain)
        return _stage_store(x, ks, col, scale, xs, KSTEPS, NS, NORM, WMODE, w_ptr, xout_ptr, pid, _T, _HK)

    @gluon.jit
    def _mma_unit(ring, s, xs, slot, acc0, acc1):
        """Issue one unit's wgmma (the stage's tile times unit slot `slot`'s staged input; waits for the unit
        before): a 128 x 64 tile is two 64-row halves into acc0 and acc1, a 64 x 128 tile two 64-deep halves
        into acc0."""
        w = ring.index(s)
        if _HM == 2:
            b = xs.index(slot).permute((1, 0))
            acc0 = warpgroup_mma(w.slice(0, 64), b, acc0, is_async=True)
            acc1 = warpgroup_mma(w.slice(64, 64), b, acc1, is_async=True)
        else:
            acc0 = warpgroup_mma(w.slice(0, _CH, dim=1), xs.index(2 * slot).permute((1, 0)), acc0, is_async=True)
            acc0 = warpgroup_mma(w.slice(_CH, _CH, dim=1), xs.index(2 * slot + 1).permute((1, 0)), acc0,
                                 is_async=True)
        return warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))

    @gluon.jit
    def _flush(y_ptr, t, rows, acc0, acc1, DET: gl.constexpr = False, N: gl.constexpr = 0, KS: gl.constexpr = 0,
               pid=0, nprog=1):
        """Row tile t's sums so far (column 0 of the MMA sums) into y by atomics, or with DET (y: the output's
        partial slots, N rows, KS units a tile) by a store to this program's slot for the tile (`_get`); returns
        fresh sums."""
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        if DET:
            y = y_ptr + (pid - _owner(t * KS, nprog, (N // _R) * KS)) * N + t * _R + rows
            gl.store(y, gl.sum(acc0, axis=1))
            if _HM == 2:
                gl.store(y + 64, gl.sum(acc1, axis=1))
        else:
            gl.atomic_add(y_ptr + t * _R + rows, gl.sum(acc0, axis=1), sem="relaxed")
            if _HM == 2:
                gl.atomic_add(y_ptr + t * _R + 64 + rows, gl.sum(acc1, axis=1), sem="relaxed")
        return gl.zeros([64, 8], gl.float32, _ACC_L), gl.zeros([64, 8], gl.float32, _ACC_L)

    @gluon.jit
    def _produce_drawn(desc, row0, ids, cnt_ptr, nprog, ring, ready, empty, codes, c, LOAD: gl.constexpr,
                       FAST: gl.constexpr):
        """Producer, gate/up with its units drawn from the counter cnt_ptr (zero before the launch) by whichever
        program asks first, until all are taken: guided self-scheduling, each draw about a quarter of the units
        left over the programs (between 1 and DRAW), sized from the counter as the draw before saw it. Each
        stage's unit goes to the consumers in codes (unit * 2 + 1 where its sums are to be flushed: a draw's last
        unit or a row tile's; `_consume_drawn`), and a last stage with code -1 and no load ends the step. The
        next draw is asked for while this one's tiles are issued."""
        STAGES: gl.constexpr = ring.type.shape[0]
        KSTEPS: gl.constexpr = _HID // _T
        UNITS: gl.constexpr = _TOP_K * _GU_TILES * KSTEPS
        size = _DRAW
        start = gl.atomic_add(cnt_ptr, size, sem="relaxed")
        while start < UNITS:
            end = gl.minimum(start + size, UNITS)
            size = gl.maximum(gl.minimum((UNITS - end) // (4 * nprog), _DRAW), 1)
            start_next = gl.atomic_add(cnt_ptr, size, sem="relaxed")
            for u in range(start, end):
                t = u // KSTEPS
                e = _expert(ids, t // _GU_TILES, FAST)
                flush = ((u + 1 == end) | ((u + 1) % KSTEPS == 0)).to(gl.int32)
                s, phase = _post_code(codes, empty, c, u * 2 + flush, STAGES)
                _issue_at(desc, row0 + e * (_GU_TILES * _R) + (t % _GU_TILES) * _R, (u % KSTEPS) * _T, ring, ready,
                          empty, s, phase, LOAD)
                c += 1
            start = start_next
        s, _ = _post_code(codes, empty, c, -1, STAGES)
        mbarrier.arrive(ready.index(s))
        return c + 1

    @gluon.jit
    def _post_code(codes, empty, c, code, STAGES: gl.constexpr):
        """Producer: `code` into codes[stage of c] once the consumers have freed that stage (`_produce_drawn`);
        returns (stage, phase). The stage's load or arrival follows; `_issue_at`'s own wait then passes at once."""
        s = c % STAGES
        phase = (c // STAGES) & 1
        mbarrier.wait(empty.index(s), phase ^ 1)
        one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        codes.index(s).store(gl.full([1], 0, gl.int32, one) + code)
        gl.thread_barrier()  # the warp's store before the (single-thread) arrival that publishes it
        return s, phase

    @gluon.jit
    def _consume_drawn(x_ptr, y_ptr, scale, ring, ready, empty, xs, codes, c):
        """Consumer of `_produce_drawn`'s gate/up: the whole input staged, then whatever units the stages bring,
        the sums flushed where the code says, until the stage with code -1."""
        STAGES: gl.constexpr = ring.type.shape[0]
        KSTEPS: gl.constexpr = _HID // _T
        _stage_input(x_ptr, x_ptr, scale, xs, 0, KSTEPS, KSTEPS, False)  # KSTEPS * HK = 32 chunks
        four: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, _ACC_L))
        acc0 = gl.zeros([64, 8], gl.float32, _ACC_L)
        acc1 = gl.zeros([64, 8], gl.float32, _ACC_L)
        prev = -1
        code = 0
        while code >= 0:
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            code = gl.max(codes.index(s).load(four), axis=0)
            if code >= 0:
                u = code // 2
                acc0, acc1 = _mma_unit(ring, s, xs, u % KSTEPS, acc0, acc1)
                if prev >= 0:  # the unit before is done in every warp: its stage is free
                    gl.thread_barrier()
                    mbarrier.arrive(empty.index(prev))
                prev = s
                if code % 2 == 1:
                    acc0, acc1 = _flush(y_ptr, u // KSTEPS, rows, acc0, acc1)
                    gl.thread_barrier()
                    mbarrier.arrive(empty.index(s))
                    prev = -1
            else:
                gl.thread_barrier()
                mbarrier.arrive(empty.index(s))
            c += 1
        return c

    @gluon.jit
    def _stage_of(c, i, side, layer, STAGES: gl.constexpr):
        """(buffer, phase) of a step's unit i: side buffer STAGES + i (one fill a layer) for its first `side`
        units, else ring stage (c + i - side) % STAGES."""
        if i < side:
            s = STAGES + i
            phase = layer & 1
        else:
            s = (c + i - side) % STAGES
            phase = ((c + i - side) // STAGES) & 1
        return s, phase

    @gluon.jit
    def _gemv_step(x_ptr, y_ptr, p_ptr, scale, N_TILES: gl.constexpr, K: gl.constexpr, ACT: gl.constexpr, ring,
                   ready, empty, c, pid, nprog, COMPUTE: gl.constexpr, WG: gl.constexpr, NWG: gl.constexpr, xs,
                   MMA: gl.constexpr, SIDE: gl.constexpr, layer=0, SIDE_UNITS: gl.constexpr = 0,
                   NORM: gl.constexpr = False, DET: gl.constexpr = False, SN: gl.constexpr = 0,
                   SKS: gl.constexpr = 0, SC: gl.constexpr = 0, plain=False, w_ptr=0, xout_ptr=0,
                   WMODE: gl.constexpr = 0):
        """A step's GEMV by the consumers: on the tensor cores (MMA, `_consume_mma`) or CUDA cores (`_consume`).
        SIDE: side buffers after the ring's stages; SIDE_UNITS: this step's first units come from them (qkv of
        `layer`, `_produce_side`). NORM: the input is to be rms-normalised, scale is ignored (`_input_scale`).
        DET, SN, SKS, SC, plain, w_ptr, xout_ptr, WMODE: as `_consume_mma`'s. Returns the ring count and the
        scale the step used."""
        if NORM:
            if not MMA:  # the MMA consumers take the norm from the values they stage
                scale = _inv_rms(x_ptr)
        if MMA:
            c, scale = _consume_mma(x_ptr, y_ptr, p_ptr, scale, N_TILES, K, ACT, ring, ready, empty, xs, c, pid,
                                    nprog, SIDE, layer, SIDE_UNITS, NORM, DET, SN, SKS, SC, plain, w_ptr, xout_ptr,
                                    WMODE)
        else:
            c = _consume(x_ptr, y_ptr, p_ptr, scale, N_TILES, K, ACT, ring, ready, empty, c, pid, nprog, COMPUTE,
                         WG, NWG)
        return c, scale

    @gluon.jit
    def _top_k(r_ptr, ids_ptr, p_ptr):
        """`decode_layer_probe._top_k` in Gluon: the top-8 logits' experts and their softmax over the 8."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs = gl.arange(0, _EXPERTS, layout=lay)
        r0 = gl.load(r_ptr + offs, cache_modifier=".cg")
        best = gl.max(r0, axis=0)
        r = r0
        total = 0.0
        for _ in gl.static_range(_TOP_K):
            m = gl.max(r, axis=0)
            total += gl.exp(m - best)
            r = gl.where(offs == gl.min(gl.where(r == m, offs, _EXPERTS), axis=0), float("-inf"), r)
        r = r0
        for j in gl.static_range(_TOP_K):
            m = gl.max(r, axis=0)
            e = gl.min(gl.where(r == m, offs, _EXPERTS), axis=0)
            gl.store(ids_ptr + j, e.to(gl.float32))
            gl.store(p_ptr + j, gl.exp(m - best) / total)
            r = gl.where(offs == e, float("-inf"), r)

    @gluon.jit
    def _top_k_ranks(r_ptr, ids_ptr, p_ptr, ids_smem, DET: gl.constexpr = False, nprog=1, xs=None,
                     CHUNKED: gl.constexpr = False):
        """`_top_k` with no serial rounds: each thread takes one expert's logit and counts the logits that beat it
        (higher, or equal at a lower index: the same order as `_top_k`), so the experts ranked 0-7 are the
        choice; one max and one sum give the softmax over them. The choice also goes to ids_smem for the
        producer (int32, rank order). CHUNKED (the MMA consumers): the others' logits come 32 at a time from
        shared memory (row 0 of xs's first staging slots, free between the router's step and gate/up's) rather
        than all 128 in every thread's registers, which spilled in the whole layer."""
        ROW: gl.constexpr = gl.BlockedLayout([1, _EXPERTS], [32, 1], [4, 1], [1, 0])  # [E, E], a row a thread
        ROW32: gl.constexpr = gl.BlockedLayout([1, 32], [32, 1], [4, 1], [1, 0])  # [E, 32]
        L: gl.constexpr = ROW32 if CHUNKED else ROW
        mine = gl.arange(0, _EXPERTS, layout=gl.SliceLayout(1, L))
        if DET:  # the router's partial slots (`_get`)
            r = _get(r_ptr, mine, DET, _EXPERTS, _HID // _T, _C_R, nprog)
        else:
            r = gl.load(r_ptr + mine, cache_modifier=".cg")
        if CHUNKED:
            rs = xs._reinterpret(gl.float32, [_XS, 4 * _CH], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            CL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [1, 4], [1, 0])  # [E // 32, 32]
            ci = gl.arange(0, _EXPERTS // 32, layout=gl.SliceLayout(1, CL))
            cj = gl.arange(0, 32, layout=gl.SliceLayout(0, CL))
            if DET:
                r2 = _get(r_ptr, ci[:, None] * 32 + cj[None, :], DET, _EXPERTS, _HID // _T, _C_R, nprog)
            else:
                r2 = gl.load(r_ptr + ci[:, None] * 32 + cj[None, :], cache_modifier=".cg")
            rs.slice(0, _EXPERTS // 32, dim=0).slice(0, 32, dim=1).store(r2)
            gl.thread_barrier()
            rank = gl.zeros_like(mine)
            for cc in gl.static_range(_EXPERTS // 32):
                others = cc * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, ROW32))[None, :]
                r_o = rs.slice(cc, 1, dim=0).slice(0, 32, dim=1).load(ROW32)  # [1, 32], in every thread
                beats = (r_o > r[:, None]) | ((r_o == r[:, None]) & (others < mine[:, None]))
                rank += gl.sum(beats.to(gl.int32), axis=1)
        else:
            others = gl.arange(0, _EXPERTS, layout=gl.SliceLayout(0, ROW))
            r_all = gl.convert_layout(r, gl.SliceLayout(0, ROW))
            beats = (r_all[None, :] > r[:, None]) | ((r_all[None, :] == r[:, None]) & (others[None, :] < mine[:, None]))
            rank = gl.sum(beats.to(gl.int32), axis=1)
        chosen = rank < _TOP_K
        e = gl.exp(r - gl.max(r, axis=0))
        p = e / gl.sum(gl.where(chosen, e, 0.0), axis=0)
        gl.store(ids_ptr + rank, mine.to(gl.float32), mask=chosen)
        gl.store(p_ptr + rank, p, mask=chosen)
        # ids_smem[j] = the expert ranked j: one pass over [TOP_K, E].
        SEL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 4], [1, 0])
        j = gl.arange(0, _TOP_K, layout=gl.SliceLayout(1, SEL))
        rank_all = gl.convert_layout(rank, gl.SliceLayout(0, SEL))
        experts = gl.arange(0, _EXPERTS, layout=gl.SliceLayout(0, SEL))
        ids = gl.sum(gl.where(rank_all[None, :] == j[:, None], experts[None, :], 0), axis=1)
        ids_smem.store(ids)

    @gluon.jit
    def _consumer(ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, ids_smem, xs, codes, qs, ps, trace_ptr,
                  w_in, w_post, w_q, w_k, k_cache, v_cache, pos_ptr, layers, SYNC: gl.constexpr,
                  COMPUTE: gl.constexpr,
                  WG: gl.constexpr, NWG: gl.constexpr, MOE_ONLY: gl.constexpr, MMA: gl.constexpr,
                  TRACE: gl.constexpr, FAST: gl.constexpr, SIDE: gl.constexpr, POLL: gl.constexpr,
                  DRAWN: gl.constexpr, ATTN: gl.constexpr, DET: gl.constexpr, FULL: gl.constexpr):
        """Consumer warpgroup WG of NWG: the steps' GEMVs from its ring stages, a grid barrier between steps
        (every warpgroup of every program arrives). MOE_ONLY: gate/up and down only, on the o, experts and
        probabilities the workspace holds. DET: fixed-order sums (`run(det=True)`). FULL: a whole Qwen3-MoE layer
        (`run(full=True)`): the norms' weights (w_in, w_post), the residual stream, and in the attention the
        per-head norms (w_q, w_k), rotary embedding and the KV store."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        STEPS: gl.constexpr = COMPUTE != 6  # the steps' norms, top-k and grid arrivals (off: timing the tiles)
        if MMA:  # the staged inputs' rows 1-7, zero for good
            flat = xs._reinterpret(gl.bfloat16, [_XS, 8 * _CH], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            ZL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
            for i in gl.static_range(_XS // 8):
                flat.slice(i * 8, 8, dim=0).store(gl.zeros([8, 8 * _CH], gl.bfloat16, ZL))
        c = 0
        n = 0
        x_ptr = x0_ptr
        res_ptr = x0_ptr  # FULL: the residual stream before the layer (the first layer's input)
        for layer in range(layers):
            ws = ws_ptr + layer * _WS
            trace = trace_ptr + (layer * nprog + pid) * _MARKS
            # Each step's output: plain sums, or with DET its partial slots (`_flush`, `_get`).
            if DET:
                o_qkv, o_a, o_o = ws + _O_QKV_P, ws + _O_A_P, ws + _O_O_P
                o_r, o_gu, o_x = ws + _O_R_P, ws + _O_GU_P, ws + _O_X_P
            else:
                o_qkv, o_a, o_o = ws, ws + _O_A, ws + _O_O
                o_r, o_gu, o_x = ws + _O_R, ws + _O_GU, ws + _O_X
            if SYNC:
                if layer > 0:
                    _grid_wait(bar_ptr, n * nprog * NWG, POLL)
            _mark(trace, 0, TRACE)
            if MOE_ONLY:
                scale = _scale(ws + _O_O, STEPS)
            else:
                if FULL:  # the layer's input: the residual before plus the MoE's output (the first: x0)
                    c, _ = _gemv_step(x_ptr, o_qkv, res_ptr, 1.0, _QKV // _R, _HID, 3, ring, ready, empty, c, pid,
                                      nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, layer, SIDE, NORM=STEPS, DET=DET,
                                      SN=_HID, SKS=_TOP_K * _INTER // _T, SC=_C_X, plain=layer == 0,
                                      w_ptr=w_in + layer * _HID, xout_ptr=ws + _O_XIN, WMODE=2)
                else:
                    c, _ = _gemv_step(x_ptr, o_qkv, ws, 1.0, _QKV // _R, _HID, False, ring, ready, empty, c, pid,
                                      nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, layer, SIDE, NORM=STEPS, DET=DET,
                                      SN=_HID, SKS=_TOP_K * _INTER // _T, SC=_C_X, plain=layer == 0)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS, trace, 1, TRACE, POLL)
                if ATTN:
                    c = _attend(ws, o_qkv, ring, ready, empty, qs, ps, c, pid, nprog, ring.type.shape[0] - SIDE, DET,
                                layer, w_q, w_k, k_cache, v_cache, pos_ptr, FULL)
                else:
                    c, _ = _gemv_step(o_qkv, o_a, ws, 1.0, _ATT // _R, _KVS, False, ring, ready, empty, c, pid,
                                      nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET, SN=_QKV, SKS=_HID // _T,
                                      SC=_C_QKV)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS, trace, 3, TRACE, POLL)
                if ATTN:  # o's input: the attention partials, merged as they are staged
                    c, _ = _gemv_step(ws, o_o, ws, 1.0, _HID // _R, _ATT, 2, ring, ready, empty, c, pid, nprog,
                                      COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET)
                else:
                    c, _ = _gemv_step(o_a, o_o, ws, 1.0, _HID // _R, _ATT, 0, ring, ready, empty, c, pid, nprog,
                                      COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET, SN=_ATT, SKS=_KVS // _T, SC=_C_A)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS, trace, 5, TRACE, POLL)
                if FULL:  # h = the layer's input + o, normalised with the post-attention norm's weight
                    c, scale = _gemv_step(o_o, o_r, ws + _O_XIN, 1.0, _EXPERTS // _R, _HID, 3, ring, ready, empty,
                                          c, pid, nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, NORM=STEPS, DET=DET,
                                          SN=_HID, SKS=_ATT // _T, SC=_C_O, w_ptr=w_post + layer * _HID,
                                          xout_ptr=ws + _O_H, WMODE=2)
                else:
                    c, scale = _gemv_step(o_o, o_r, ws, 1.0, _EXPERTS // _R, _HID, False, ring, ready, empty, c, pid,
                                          nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, NORM=STEPS, DET=DET, SN=_HID,
                                          SKS=_ATT // _T, SC=_C_O)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS, trace, 7, TRACE, POLL)
            if WG == 0:
                if not MOE_ONLY:
                    if STEPS:
                        if FAST:
                            _top_k_ranks(o_r, ws + _O_IDS, ws + _O_P, ids_smem, DET, nprog, xs, MMA)
                        else:
                            _top_k(ws + _O_R, ws + _O_IDS, ws + _O_P)
                gl.thread_barrier()
                mbarrier.arrive(ids_bar)  # the producer may load the chosen experts' tiles
            _mark(trace, 9, TRACE)
            if DRAWN:
                c = _consume_drawn(ws + _O_O, ws + _O_GU, scale, ring, ready, empty, xs, codes, c)
            elif FULL:  # h as program 0 stored it, with the router's scale and the norm's weight
                c, _ = _gemv_step(ws + _O_H, o_gu, ws, scale, _TOP_K * _GU_TILES, _HID, False, ring, ready, empty, c,
                                  pid, nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET, plain=True,
                                  w_ptr=w_post + layer * _HID, WMODE=1)
            else:
                c, _ = _gemv_step(o_o, o_gu, ws, scale, _TOP_K * _GU_TILES, _HID, False, ring, ready, empty, c, pid,
                                  nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET, SN=_HID, SKS=_ATT // _T, SC=_C_O)
            n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS, trace, 10, TRACE, POLL)
            c, _ = _gemv_step(o_gu, o_x, ws + _O_P, 1.0, _HID // _R, _TOP_K * _INTER, True, ring, ready, empty, c,
                              pid, nprog, COMPUTE, WG, NWG, xs, MMA, SIDE, DET=DET, SN=_TOP_K * 2 * _INTER,
                              SKS=_HID // _T, SC=_C_GU)
            _mark(trace, 12, TRACE)
            if STEPS:
                _grid_arrive(bar_ptr)
            n += 1
            x_ptr = o_x
            res_ptr = ws + _O_H

    @gluon.jit
    def _grid_step(bar_ptr, n, nprog, SYNC: gl.constexpr, ARRIVE: gl.constexpr, trace, mark: gl.constexpr,
                   TRACE: gl.constexpr, POLL: gl.constexpr):
        """Arrive at the grid barrier after a step and wait for every program (for timing only: not without SYNC,
        no arrival without ARRIVE); returns the barriers passed. TRACE: the times of arrival and of passing into
        trace[mark], trace[mark + 1]."""
        _mark(trace, mark, TRACE)
        if ARRIVE:
            _grid_arrive(bar_ptr)
        if SYNC:
            _grid_wait(bar_ptr, (n + 1) * nprog, POLL)
        _mark(trace, mark + 1, TRACE)
        return n + 1

    @gluon.jit
    def _layer_ring_kernel(d_qkv, d_kv, d_o, d_r, d_13, d_2, d_kc, d_vc, ws_ptr, x0_ptr, bar_ptr, cnt_ptr, trace_ptr,
                           w_in, w_post, w_q, w_k, k_cache, v_cache, pos_ptr, layers,
                           STAGES: gl.constexpr, SYNC: gl.constexpr, COMPUTE: gl.constexpr, NWG: gl.constexpr,
                           MOE_ONLY: gl.constexpr, LOAD: gl.constexpr, MMA: gl.constexpr, TRACE: gl.constexpr,
                           FAST: gl.constexpr, SIDE: gl.constexpr, POLL: gl.constexpr, DRAWN: gl.constexpr,
                           CAP: gl.constexpr, ATTN: gl.constexpr, DET: gl.constexpr, FULL: gl.constexpr):
        ring = gl.allocate_shared_memory(d_qkv.dtype, [STAGES + SIDE, _R, _T], d_qkv.layout)
        if MMA:  # the step's input chunks as wgmma's B operand: [8, 64] tiles, row 0 the input
            xs = gl.allocate_shared_memory(gl.bfloat16, [_XS, 8, _CH],
                                           gl.NVMMASharedLayout.get_default_for([8, _CH], gl.bfloat16))
        else:
            xs = ring
        ready = gl.allocate_shared_memory(gl.int64, [STAGES + SIDE, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES + SIDE, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES + SIDE):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        ids_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(ids_bar, count=1)
        ids_smem = gl.allocate_shared_memory(gl.int32, [_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        codes = gl.allocate_shared_memory(gl.int32, [STAGES + SIDE, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        if ATTN:  # real attention's B operands: the group's q (two 64-dim halves) and the chunk's P^T
            qs = gl.allocate_shared_memory(gl.bfloat16, [2, _GRP, _CH],
                                           gl.NVMMASharedLayout.get_default_for([_GRP, _CH], gl.bfloat16))
            ps = gl.allocate_shared_memory(gl.bfloat16, [_GRP, _CT],
                                           gl.NVMMASharedLayout.get_default_for([_GRP, _CT], gl.bfloat16))
        else:
            qs = xs
            ps = xs
        # The two lists repeat their entries: Gluon 3.6 takes no JIT function from a variable, and a tuple of the
        # arguments loses their constexpr-ness (tried, session 28).
        if NWG == 2:
            gl.warp_specialize([
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, ids_smem, xs, codes, qs, ps,
                             trace_ptr, w_in, w_post, w_q, w_k, k_cache, v_cache, pos_ptr, layers, SYNC, COMPUTE,
                             gl.constexpr(0), NWG, MOE_ONLY, MMA, TRACE, FAST, SIDE, POLL, DRAWN, ATTN, DET, FULL)),
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, ids_smem, xs, codes, qs, ps,
                             trace_ptr, w_in, w_post, w_q, w_k, k_cache, v_cache, pos_ptr, layers, SYNC, COMPUTE,
                             gl.constexpr(1), NWG, MOE_ONLY, MMA, TRACE, FAST, SIDE, POLL, DRAWN, ATTN, DET, FULL)),
                (_producer, (d_qkv, d_kv, d_o, d_r, d_13, d_2, d_kc, d_vc, ws_ptr, ring, ready, empty, ids_bar,
                             ids_smem, codes, cnt_ptr, trace_ptr, layers, MOE_ONLY, LOAD, TRACE, FAST, SIDE, DRAWN, CAP,
                             ATTN)),
            ], [4, 1], [232, 40])
        else:
            gl.warp_specialize([
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, ids_smem, xs, codes, qs, ps,
                             trace_ptr, w_in, w_post, w_q, w_k, k_cache, v_cache, pos_ptr, layers, SYNC, COMPUTE,
                             gl.constexpr(0), NWG, MOE_ONLY, MMA, TRACE, FAST, SIDE, POLL, DRAWN, ATTN, DET, FULL)),
                (_producer, (d_qkv, d_kv, d_o, d_r, d_13, d_2, d_kc, d_vc, ws_ptr, ring, ready, empty, ids_bar,
                             ids_smem, codes, cnt_ptr, trace_ptr, layers, MOE_ONLY, LOAD, TRACE, FAST, SIDE, DRAWN, CAP,
                             ATTN)),
            ], [1], [48])


def run(m, programs: int, stages: int = 12, sync: bool = True, compute: int = 1, warpgroups: int = 1,
        moe_only: bool = False, load: int = 1, mma: bool = False, trace: torch.Tensor | None = None,
        fast: bool = False, side: int = 0, poll: bool = False, drawn: bool = False, cap: int = 0,
        attention: bool = False, det: bool = False, full: bool = False) -> None:
    """`decode_layer_probe.Layers.run_persistent`'s work by `_layer_ring_kernel` (m: a `Layers`). For timing the
    stream alone: sync=False skips the grid barriers' waits, compute=0 the consumers' arithmetic (results are
    then wrong; the workspace is kept, so the experts chosen stay those of the run before), compute=2-4 parts of
    it (`_consume`'s ablations, with load=False only). warpgroups: the
    consumer warpgroups a program has (1 or 2). moe_only: only gate/up and down, on the o, experts and
    probabilities the workspace holds from the run before. load=0: the producer marks stages ready without
    loading them, load=2 does nothing (with compute=5 or 6; the consumers' own rate; wrong results). mma: the
    consumers' GEMVs on the tensor cores (`_consume_mma`; one warpgroup, compute 1, and a program's units of a
    step must fit XS staged chunks: at least 96 programs). trace: an int64 tensor of [layers, programs, MARKS]
    for the GPU timer at `TRACE_MARKS`. fast: the router's choice by ranks and handed to the producer in shared
    memory (`_top_k_ranks`). side: that many side buffers for each layer's first qkv tiles, loaded while the
    layer before waits for its router (mma, not moe_only). poll: grid barriers polled by loads (`_grid_wait`).
    drawn: gate/up's units drawn from a counter by whichever program is free (mma, no side buffers). cap: at most
    that many of a program's weight loads in flight (0: as many as the ring has stages; not with drawn). attention:
    real attention over m's KV cache in place of the stand-in GEMV (mma, 64 x 128 tiles, at least 128 programs so
    that o's units fit the merge's staging; sets m.attention, which the reference check follows). det: fixed-order
    sums, each step's partials to slots of their own rather than fp32 atomics, so that reruns give the same bits
    (mma and fast, not drawn or moe_only; sets m.det_sum, which the reference check follows). full: a whole
    Qwen3-MoE layer (with attention and fast): the norms' weights, the residual stream, the per-head q and k norms,
    rotary embedding and the KV store (sets m.full, which the reference check follows)."""
    ring_kb = (stages + side) * ROWS * TILE * 2 // 1024 + (XS * 8 * CHUNK * 2 // 1024 if mma else 0)
    rules = (  # (broken, what is allowed)
        (mma and (warpgroups != 1 or compute != 1), "mma takes one consumer warpgroup and compute=1"),
        (mma and programs < 96, "mma takes at least 96 programs"),
        (ring_kb > 224, f"the buffers take at most 224 KB, these {ring_kb}"),
        ((side or fast or det) and moe_only, "side, fast and det take all the steps, not moe_only"),
        ((side or drawn or attention or det) and not mma, "side, drawn, attention and det take mma"),
        (drawn and (side or cap or det), "drawn takes no side buffers, cap or det"),
        (cap >= stages, "cap must be below the stages"),
        (attention and ((ROWS, TILE) != (CHUNK_TOKENS, HEAD_DIM) or programs < 128),
         "attention takes 64 x 128 tiles and at least 128 programs"),
        (det and (not fast or ROWS != 64), "det takes fast and 64 x 128 tiles"),
        (full and not (attention and fast), "full takes attention and fast"),
    )
    broken = [allowed for bad, allowed in rules if bad]
    if broken:
        raise ValueError("; ".join(broken))
    if sync and compute == 1 and load == 1 and not moe_only:
        m.ws.zero_()
    m.bar.zero_()
    if det:
        for (name, size, slots), k in zip(DET_OUTPUTS, (HID, KVS, ATT, HID, HID, TOP_K * INTER)):
            if det_slots(size, k // TILE, programs) > slots:
                raise ValueError(f"{programs} programs share a row tile of {name} more than its {slots} slots")
    m.attention, m.full = attention, full
    m.det_sum = (lambda layer: det_output(m, layer, programs)) if det else None
    descs = [host_descriptor(w.view(-1, w.shape[-1]), [ROWS, TILE]) for w in (*m.weights(), m.k_cache, m.v_cache)]
    counters = torch.zeros(m.layers, dtype=torch.int32, device=m.ws.device)
    _layer_ring_kernel[(programs,)](*descs, m.ws, m.x0, m.bar, counters, m.bar if trace is None else trace,
                                    m.w_in, m.w_post, m.w_q, m.w_k, m.k_cache, m.v_cache, m.pos, m.layers,
                                    STAGES=stages, SYNC=sync, COMPUTE=compute, NWG=warpgroups,
                                    MOE_ONLY=moe_only, LOAD=load, MMA=mma, TRACE=trace is not None, FAST=fast,
                                    SIDE=side, POLL=poll, DRAWN=drawn, CAP=cap, ATTN=attention, DET=det,
                                    FULL=full, num_warps=4)


def det_slots(rows: int, ks: int, programs: int) -> int:
    """The most programs that share one of the output's row tiles (of ROWS rows)."""
    return _det_slots(rows, ks, programs, ROWS)


def det_output(m, layer: int, programs: int) -> torch.Tensor:
    """Layer's output from a `run(det=True)`: down's partial slots summed, each row tile over the programs that
    wrote it."""
    slots = dict((name, n) for name, _, n in DET_OUTPUTS)["x"]
    parts = m.ws[layer, OFFS["x_p"]:OFFS["x_p"] + slots * HID].view(slots, HID)
    return torch.cat([parts[:count, t * ROWS:(t + 1) * ROWS].sum(0)
                      for t, (_, count) in enumerate(tile_owners(HID, TOP_K * INTER // TILE, programs, ROWS))])


def available(device: torch.device) -> bool:
    from moeserve.kernels.gluon_support import gluon_platform_problem

    return gluon_platform_problem(device, "the ring probe") is None


def print_trace(trace: torch.Tensor) -> list[dict]:
    """`trace_report`'s rows, printed a line each."""
    rows = trace_report(trace)
    for row in rows:
        print(f"  {row['part']:<44} {row['mean_us']:7.2f}" + (f"  slowest program {row['slowest_us']:7.2f}"
                                                             if "slowest_us" in row else ""))
    return rows


def trace_report(trace: torch.Tensor) -> list[dict]:
    """What a traced run's layers spent (µs, means over layers 1.. of the run; layer 0 starts cold): each step's
    time from its start (the barrier before it passed) to its end, as the mean and the slowest program take it;
    each barrier's wait, as the time from the mean program's arrival to the last one's (skew) and from the last
    arrival to the first program passing (latency; down's barrier is passed into the next layer); the producer's
    wait for the router's choice. Where the kernel marks them (the engine's stack): when the producer has issued
    the layer's qkv tiles, and within each GEMV step its input's staging and its tiles."""
    t = trace[1:].double() / 1e3  # [layers - 1, programs, MARKS], µs
    mark = {name: i for i, name in enumerate(TRACE_MARKS)}

    def col(name: str) -> torch.Tensor:
        return t[:, :, mark[name]]

    rows = []
    # The engine's stack ranks the router's choice inside the o step, before o's tiles ("o staged" to "ids
    # published"); the probe's kernels after o's barrier.
    first = bool((col("ids published") < col("o done")).all())
    router = (("r", "o staged", "r done"), ("top-k", "r passed", "ids published"), ("gu", "o passed", "gu done")) \
        if first else (("r", "o passed", "r done"), ("top-k", "r passed", "ids published"),
                       ("gu", "ids published", "gu done"))
    phases = (("qkv", "start", "qkv done"), ("kv", "qkv passed", "kv done"), ("o", "kv passed", "o done"), *router,
              ("down", "gu passed", "down done"))
    for name, begin, end in phases:
        d = col(end) - col(begin)
        rows.append(dict(part=f"step {name}", mean_us=d.mean().item(), slowest_us=d.max(dim=1).values.mean().item()))
    for name in ("qkv", "kv", "o", "gu") if first else ("qkv", "kv", "o", "r", "gu"):
        done, passed = col(f"{name} done"), col(f"{name} passed")
        last = done.max(dim=1).values
        rows.append(dict(part=f"barrier after {name}: skew", mean_us=(last - done.mean(dim=1)).mean().item()))
        rows.append(dict(part=f"barrier after {name}: latency", mean_us=(passed.min(dim=1).values - last).mean().item(),
                         slowest_us=(passed.max(dim=1).values - last).mean().item()))
    done, passed = t[:-1, :, mark["down done"]], t[1:, :, mark["start"]]  # into the next layer
    if len(done):
        last = done.max(dim=1).values
        rows.append(dict(part="barrier after down: skew", mean_us=(last - done.mean(dim=1)).mean().item()))
        rows.append(dict(part="barrier after down: latency", mean_us=(passed.min(dim=1).values - last).mean().item(),
                         slowest_us=(passed.max(dim=1).values - last).mean().item()))
    issued = col("producer issued qkv")
    if (issued != 0).all():  # the engine's stack marks it, the probe's kernels do not
        d = issued - col("start")
        rows.append(dict(part="producer's last qkv tile issued, after the layer's start", mean_us=d.mean().item(),
                         slowest_us=d.max(dim=1).values.mean().item()))
    begins = dict(qkv="start", o="kv passed", gu="o passed" if first else "ids published", down="gu passed")
    for step, begin in begins.items():  # within the engine's GEMV steps (the probe's kernels do not mark these)
        marks = [begin, *(f"{step} {what}" for what in ("staged", "first tile", "last tile", "tiles done", "done"))]
        parts = ["staging", "to the first tile", "first to last tile", "the last tile", "after the tiles"]
        if step == "o" and first:  # the router's part and choice between o's staging and its tiles
            marks.insert(2, "ids published")
            parts[1:2] = ["the router's part and choice", "to the first tile"]
        if all((col(name) != 0).all() for name in marks[1:5]):
            for part, a, b in zip(parts, marks, marks[1:]):
                d = col(b) - col(a)
                rows.append(dict(part=f"  {step}: {part}", mean_us=d.mean().item(),
                                 slowest_us=d.max(dim=1).values.mean().item()))
    wait = col("producer has ids") - col("producer waits ids")
    rows.append(dict(part="producer waits for the router's choice", mean_us=wait.mean().item(),
                     slowest_us=wait.max(dim=1).values.mean().item()))
    layer = trace[2:, :, mark["start"]].double().mean(dim=1) - trace[1:-1, :, mark["start"]].double().mean(dim=1)
    rows.append(dict(part="a layer (start to next start)", mean_us=(layer / 1e3).mean().item()))
    return rows
