"""`decode_layer_probe.py`'s layer as one persistent, warp-specialised Gluon kernel whose weight loads never wait
for the data.

In each program a producer warp streams the program's weight tiles of every step, layer after layer, by TMA
into a ring of shared-memory stages, as far ahead as the ring reaches. It waits only for a free stage, and
before the experts' tiles for the router's choice. The consumer warps (one warpgroup, or two taking alternate
stages) compute each step's GEMV on CUDA cores from the ring once the step's input is whole (the same grid
barriers as the Triton probe's persistent kernel). So the weight stream runs through the barriers and the small
steps, up to the ring's depth (stages x 16 KB a multiprocessor), where the Triton kernels' loads start only after
each barrier. Same steps, work split, workspace and results as `decode_layer_probe`; Triton 3.6's Gluon, Hopper.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_layer_probe import ATT, EXPERTS, HID, INTER, KVS, OFFS, QKV, TOP_K, WS  # noqa: E402

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

TILE, ROWS = 64, 128  # a ring stage: 128 weight rows x 64 k (16 KB of bf16)
XS = 64  # MMA consumers: a step's input chunks staged in shared memory, at most this many a program

if gluon is not None:
    _HID, _QKV, _KVS, _ATT = gl.constexpr(HID), gl.constexpr(QKV), gl.constexpr(KVS), gl.constexpr(ATT)
    _EXPERTS, _TOP_K, _INTER = gl.constexpr(EXPERTS), gl.constexpr(TOP_K), gl.constexpr(INTER)
    _T, _R = gl.constexpr(TILE), gl.constexpr(ROWS)
    # The workspace's float offsets (`decode_layer_probe.OFFS`).
    _O_A, _O_O, _O_R = gl.constexpr(OFFS["a"]), gl.constexpr(OFFS["o"]), gl.constexpr(OFFS["r"])
    _O_GU, _O_X = gl.constexpr(OFFS["gu"]), gl.constexpr(OFFS["x"])
    _O_IDS, _O_P, _WS = gl.constexpr(OFFS["ids"]), gl.constexpr(OFFS["p"]), gl.constexpr(WS)
    # An expert's row tiles in gate/up (gate's rows, then up's) and k steps in down.
    _GU_TILES = gl.constexpr(2 * INTER // ROWS)
    _DN_STEPS = gl.constexpr(INTER // TILE)
    _XS = gl.constexpr(XS)

    @gluon.jit
    def _units(pid, nprog, total):
        return pid * total // nprog, (pid + 1) * total // nprog

    @gluon.jit
    def _issue(desc, row, col, ring, ready, empty, c, LOAD: gl.constexpr):
        """Producer: the [128, 64] weight tile at (row, col) into stage c % STAGES once it is free. For timing
        the consumers alone, LOAD 0 only marks the stage ready, and LOAD 2 does nothing (the consumers then skip
        the handshakes too, `_take`)."""
        STAGES: gl.constexpr = ring.type.shape[0]
        s = c % STAGES
        if LOAD != 2:
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        if LOAD == 1:
            mbarrier.expect(ready.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [row, col], ready.index(s), ring.index(s))
        elif LOAD == 0:
            mbarrier.arrive(ready.index(s))
        return c + 1

    @gluon.jit
    def _produce_dense(desc, row0, N_TILES: gl.constexpr, KSTEPS: gl.constexpr, ring, ready, empty, c, pid, nprog,
                       LOAD: gl.constexpr, ids=None, EXPERT_TILES: gl.constexpr = 0):
        """The program's units of a GEMV over desc's rows from row0, a row tile's k steps in turn. EXPERT_TILES:
        the rows are experts of EXPERT_TILES row tiles each, and row tile t is tile t % EXPERT_TILES of expert
        ids[t // EXPERT_TILES] (gate/up over the chosen experts, as `decode_layer_probe._gemv`)."""
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        for u in range(u0, u1):
            t = u // KSTEPS
            if EXPERT_TILES:
                e = gl.load(ids + t // EXPERT_TILES).to(gl.int32)
                row = row0 + e * (EXPERT_TILES * _R) + (t % EXPERT_TILES) * _R
            else:
                row = row0 + t * _R
            c = _issue(desc, row, (u % KSTEPS) * _T, ring, ready, empty, c, LOAD)
        return c

    @gluon.jit
    def _producer(d_qkv, d_kv, d_o, d_r, d_13, d_2, ws_ptr, ring, ready, empty, ids_bar, layers,
                  MOE_ONLY: gl.constexpr, LOAD: gl.constexpr):
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        c = 0
        for layer in range(layers):
            ids = ws_ptr + layer * _WS + _O_IDS
            if not MOE_ONLY:
                c = _produce_dense(d_qkv, layer * _QKV, _QKV // _R, _HID // _T, ring, ready, empty, c, pid, nprog,
                                   LOAD)
                c = _produce_dense(d_kv, layer * _ATT, _ATT // _R, _KVS // _T, ring, ready, empty, c, pid, nprog,
                                   LOAD)
                c = _produce_dense(d_o, layer * _HID, _HID // _R, _ATT // _T, ring, ready, empty, c, pid, nprog,
                                   LOAD)
                c = _produce_dense(d_r, layer * _EXPERTS, _EXPERTS // _R, _HID // _T, ring, ready, empty, c, pid,
                                   nprog, LOAD)
            mbarrier.wait(ids_bar, layer & 1)  # this program's consumers have stored the router's choice
            c = _produce_dense(d_13, layer * _EXPERTS * 2 * _INTER, _TOP_K * _GU_TILES, _HID // _T, ring, ready,
                               empty, c, pid, nprog, LOAD, ids, _GU_TILES)
            KD: gl.constexpr = _TOP_K * _DN_STEPS
            u0, u1 = _units(pid, nprog, (_HID // _R) * KD)
            for u in range(u0, u1):
                ks = u % KD
                e = gl.load(ids + ks // _DN_STEPS).to(gl.int32)
                row = (layer * _EXPERTS + e) * _HID + (u // KD) * _R
                c = _issue(d_2, row, (ks % _DN_STEPS) * _T, ring, ready, empty, c, LOAD)

    @gluon.jit
    def _grid_arrive(bar_ptr):
        gl.thread_barrier()  # every thread's atomics of the step before the (single-thread) release
        gl.atomic_add(bar_ptr, 1, sem="release")

    @gluon.jit
    def _grid_wait(bar_ptr, target):
        """Spin on the count with acquire reads (polling by volatile loads, then one acquire, took 1-2% longer)."""
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
    def _x_chunk(x_ptr, p_ptr, ks, cols, ACT: gl.constexpr):
        """The input's 64 values of k step ks: x[ks * 64 + cols], or with ACT (down, x_ptr: the gate/up sums)
        silu(g) * u * p of expert ks // 12's channels."""
        if ACT:
            j = ks // _DN_STEPS
            ch = (ks % _DN_STEPS) * _T + cols
            g = gl.load(x_ptr + j * 2 * _INTER + ch)
            up = gl.load(x_ptr + j * 2 * _INTER + _INTER + ch)
            x = g / (1.0 + gl.exp(-g)) * up * gl.load(p_ptr + j)
        else:
            x = gl.load(x_ptr + ks * _T + cols)
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
                     ready, empty, xs, c, pid, nprog):
        """`_consume` on the tensor cores (one consumer warpgroup): the step's input chunks of the program's units
        are loaded at once, scaled, rounded to bf16 and staged as row 0 of [8, 64] tiles in shared memory (rows
        1-7 stay zero), then each unit is two wgmma m64n8 over the ring stage's two 64-row halves, the next
        unit's issued before the last one's are waited for. Column 0 of the [64, 8] sums is the rows' result."""
        STAGES: gl.constexpr = ring.type.shape[0]
        KSTEPS: gl.constexpr = K // _T
        NS: gl.constexpr = KSTEPS if KSTEPS < _XS else _XS
        u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
        n = u1 - u0
        # Stage: slot j holds k step (u0 + j) % KSTEPS, so unit u reads slot (u - u0) % KSTEPS (n <= XS, `run`).
        SL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        j = gl.arange(0, NS, layout=gl.SliceLayout(1, SL))
        cols = gl.arange(0, _T, layout=gl.SliceLayout(0, SL))
        x = _x_chunk(x_ptr, p_ptr, ((u0 + j) % KSTEPS)[:, None], cols[None, :], ACT) * scale
        flat = xs._reinterpret(gl.bfloat16, [_XS, 8 * _T], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        flat.slice(0, NS, dim=0).slice(0, _T, dim=1).store(x.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16])
        rows = gl.arange(0, _R // 2, layout=gl.SliceLayout(1, acc_l))
        acc0 = gl.zeros([_R // 2, 8], gl.float32, acc_l)
        acc1 = gl.zeros([_R // 2, 8], gl.float32, acc_l)
        for i in range(n):
            u = u0 + i
            t = u // KSTEPS
            s = (c + i) % STAGES
            mbarrier.wait(ready.index(s), ((c + i) // STAGES) & 1)
            w = ring.index(s)
            b = xs.index(i % KSTEPS).permute((1, 0))
            acc0 = warpgroup_mma(w.slice(0, _R // 2), b, acc0, is_async=True)
            acc1 = warpgroup_mma(w.slice(_R // 2, _R // 2), b, acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            if i > 0:  # the unit before is done in every warp: its stage is free
                gl.thread_barrier()
                mbarrier.arrive(empty.index((c + i - 1) % STAGES))
            if ((u + 1) // KSTEPS != t) | (i + 1 == n):
                acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
                gl.atomic_add(y_ptr + t * _R + rows, gl.sum(acc0, axis=1), sem="relaxed")
                gl.atomic_add(y_ptr + t * _R + _R // 2 + rows, gl.sum(acc1, axis=1), sem="relaxed")
                acc0 = gl.zeros([_R // 2, 8], gl.float32, acc_l)
                acc1 = gl.zeros([_R // 2, 8], gl.float32, acc_l)
        if n > 0:
            gl.thread_barrier()
            mbarrier.arrive(empty.index((c + n - 1) % STAGES))
        return c + n

    @gluon.jit
    def _gemv_step(x_ptr, y_ptr, p_ptr, scale, N_TILES: gl.constexpr, K: gl.constexpr, ACT: gl.constexpr, ring,
                   ready, empty, c, pid, nprog, COMPUTE: gl.constexpr, WG: gl.constexpr, NWG: gl.constexpr, xs,
                   MMA: gl.constexpr):
        """A step's GEMV by the consumers: on the tensor cores (MMA, `_consume_mma`) or CUDA cores (`_consume`)."""
        if MMA:
            c = _consume_mma(x_ptr, y_ptr, p_ptr, scale, N_TILES, K, ACT, ring, ready, empty, xs, c, pid, nprog)
        else:
            c = _consume(x_ptr, y_ptr, p_ptr, scale, N_TILES, K, ACT, ring, ready, empty, c, pid, nprog, COMPUTE,
                         WG, NWG)
        return c

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
    def _consumer(ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, xs, layers, SYNC: gl.constexpr,
                  COMPUTE: gl.constexpr, WG: gl.constexpr, NWG: gl.constexpr, MOE_ONLY: gl.constexpr,
                  MMA: gl.constexpr):
        """Consumer warpgroup WG of NWG: the steps' GEMVs from its ring stages, a grid barrier between steps
        (every warpgroup of every program arrives). MOE_ONLY: gate/up and down only, on the o, experts and
        probabilities the workspace holds."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        STEPS: gl.constexpr = COMPUTE != 6  # the steps' norms, top-k and grid arrivals (off: timing the tiles)
        if MMA:  # the staged inputs' rows 1-7, zero for good
            flat = xs._reinterpret(gl.bfloat16, [_XS, 8 * _T], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            ZL: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
            for i in gl.static_range(_XS // 8):
                flat.slice(i * 8, 8, dim=0).store(gl.zeros([8, 8 * _T], gl.bfloat16, ZL))
        c = 0
        n = 0
        x_ptr = x0_ptr
        for layer in range(layers):
            ws = ws_ptr + layer * _WS
            if SYNC:
                if layer > 0:
                    _grid_wait(bar_ptr, n * nprog * NWG)
            if MOE_ONLY:
                scale = _scale(ws + _O_O, STEPS)
            else:
                c = _gemv_step(x_ptr, ws, ws, _scale(x_ptr, STEPS), _QKV // _R, _HID, False, ring, ready, empty, c,
                               pid, nprog, COMPUTE, WG, NWG, xs, MMA)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS)
                c = _gemv_step(ws, ws + _O_A, ws, 1.0, _ATT // _R, _KVS, False, ring, ready, empty, c, pid, nprog,
                               COMPUTE, WG, NWG, xs, MMA)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS)
                c = _gemv_step(ws + _O_A, ws + _O_O, ws, 1.0, _HID // _R, _ATT, False, ring, ready, empty, c, pid,
                               nprog, COMPUTE, WG, NWG, xs, MMA)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS)
                scale = _scale(ws + _O_O, STEPS)
                c = _gemv_step(ws + _O_O, ws + _O_R, ws, scale, _EXPERTS // _R, _HID, False, ring, ready, empty, c,
                               pid, nprog, COMPUTE, WG, NWG, xs, MMA)
                n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS)
            if WG == 0:
                if not MOE_ONLY:
                    if STEPS:
                        _top_k(ws + _O_R, ws + _O_IDS, ws + _O_P)
                gl.thread_barrier()
                mbarrier.arrive(ids_bar)  # the producer may load the chosen experts' tiles
            c = _gemv_step(ws + _O_O, ws + _O_GU, ws, scale, _TOP_K * _GU_TILES, _HID, False, ring, ready, empty,
                           c, pid, nprog, COMPUTE, WG, NWG, xs, MMA)
            n = _grid_step(bar_ptr, n, nprog * NWG, SYNC, STEPS)
            c = _gemv_step(ws + _O_GU, ws + _O_X, ws + _O_P, 1.0, _HID // _R, _TOP_K * _INTER, True, ring, ready,
                           empty, c, pid, nprog, COMPUTE, WG, NWG, xs, MMA)
            if STEPS:
                _grid_arrive(bar_ptr)
            n += 1
            x_ptr = ws + _O_X

    @gluon.jit
    def _grid_step(bar_ptr, n, nprog, SYNC: gl.constexpr, ARRIVE: gl.constexpr = True):
        """Arrive at the grid barrier after a step and wait for every program (for timing only: not without SYNC,
        no arrival without ARRIVE); returns the barriers passed."""
        if ARRIVE:
            _grid_arrive(bar_ptr)
        if SYNC:
            _grid_wait(bar_ptr, (n + 1) * nprog)
        return n + 1

    @gluon.jit
    def _layer_ring_kernel(d_qkv, d_kv, d_o, d_r, d_13, d_2, ws_ptr, x0_ptr, bar_ptr, layers, STAGES: gl.constexpr,
                           SYNC: gl.constexpr, COMPUTE: gl.constexpr, NWG: gl.constexpr, MOE_ONLY: gl.constexpr,
                           LOAD: gl.constexpr, MMA: gl.constexpr):
        ring = gl.allocate_shared_memory(d_qkv.dtype, [STAGES, _R, _T], d_qkv.layout)
        if MMA:  # the step's input chunks as wgmma's B operand: [8, 64] tiles, row 0 the input
            xs = gl.allocate_shared_memory(gl.bfloat16, [_XS, 8, _T],
                                           gl.NVMMASharedLayout.get_default_for([8, _T], gl.bfloat16))
        else:
            xs = ring
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        ids_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(ids_bar, count=1)
        if NWG == 2:
            gl.warp_specialize([
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, xs, layers, SYNC, COMPUTE,
                             gl.constexpr(0), NWG, MOE_ONLY, MMA)),
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, xs, layers, SYNC, COMPUTE,
                             gl.constexpr(1), NWG, MOE_ONLY, MMA)),
                (_producer, (d_qkv, d_kv, d_o, d_r, d_13, d_2, ws_ptr, ring, ready, empty, ids_bar, layers,
                             MOE_ONLY, LOAD)),
            ], [4, 1], [232, 40])
        else:
            gl.warp_specialize([
                (_consumer, (ws_ptr, x0_ptr, bar_ptr, ring, ready, empty, ids_bar, xs, layers, SYNC, COMPUTE,
                             gl.constexpr(0), NWG, MOE_ONLY, MMA)),
                (_producer, (d_qkv, d_kv, d_o, d_r, d_13, d_2, ws_ptr, ring, ready, empty, ids_bar, layers,
                             MOE_ONLY, LOAD)),
            ], [1], [48])

def run(m, programs: int, stages: int = 12, sync: bool = True, compute: int = 1, warpgroups: int = 1,
        moe_only: bool = False, load: int = 1, mma: bool = False) -> None:
    """`decode_layer_probe.Layers.run_persistent`'s work by `_layer_ring_kernel` (m: a `Layers`). For timing the
    stream alone: sync=False skips the grid barriers' waits, compute=0 the consumers' arithmetic (results are
    then wrong; the workspace is kept, so the experts chosen stay those of the run before), compute=2-4 parts of
    it (`_consume`'s ablations, with load=False only). warpgroups: the
    consumer warpgroups a program has (1 or 2). moe_only: only gate/up and down, on the o, experts and
    probabilities the workspace holds from the run before. load=0: the producer marks stages ready without
    loading them, load=2 does nothing (with compute=5 or 6; the consumers' own rate; wrong results). mma: the
    consumers' GEMVs on the tensor cores (`_consume_mma`; one warpgroup, compute 1, at most 9 stages beside the
    staged inputs, and a program's units of a step must fit XS staged chunks: at least 48 programs)."""
    if mma and (warpgroups != 1 or compute != 1 or stages > 9 or programs < 48):
        raise ValueError(f"mma takes one consumer warpgroup, compute=1, at most 9 stages and 48 programs, got "
                         f"{warpgroups}, {compute}, {stages}, {programs}")
    if sync and compute == 1 and load == 1 and not moe_only:
        m.ws.zero_()
    m.bar.zero_()
    descs = [host_descriptor(w.view(-1, w.shape[-1]), [ROWS, TILE]) for w in m.weights()]
    _layer_ring_kernel[(programs,)](*descs, m.ws, m.x0, m.bar, m.layers, STAGES=stages, SYNC=sync, COMPUTE=compute,
                                    NWG=warpgroups, MOE_ONLY=moe_only, LOAD=load, MMA=mma, num_warps=4)


def available(device: torch.device) -> bool:
    from moeserve.kernels.gluon_support import gluon_platform_problem

    return gluon_platform_problem(device, "the ring probe") is None
