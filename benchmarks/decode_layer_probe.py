"""Can a batch-1 decode layer stream its weights near the HBM floor in one persistent kernel? A probe.

    python benchmarks/decode_layer_probe.py [--layers 8] [--stages 12,6] [--rings 10:0:2,...] [--only REGEX]
                                            [--out benchmarks/out/decode_layer_probe.json]
    python benchmarks/decode_layer_probe.py --xcompile DIR   # no GPU: the kernels built for sm_90a (xcompile.py)

At batch 1 the engine's Qwen3-30B-A3B layer takes 65.5 µs against a 39 µs byte floor (benchmarks/RESULTS.md,
"Engine on one H100"): its four weight streams run as separate kernels, each paying its own launch and ramp, and
five small kernels sit between them. This probe runs the layer's data flow with the real weight shapes as
GEMVs, without the arithmetic that is not a weight stream (no rotary, no real attention, no norm weights):

    qkv = Wqkv . rms(x)         [5120 x 2048]   21.0 MB
    a   = Wkv . qkv[:256]       [4096 x 256]     2.1 MB   (stands in for reading the KV cache)
    o   = Wo . a                [2048 x 4096]   16.8 MB
    r   = Wr . rms(o)           [128 x 2048]     0.5 MB   (router logits; top-8, softmax over the 8)
    gu  = W13[e] . rms(o)       8 x [1536 x 2048] 50.3 MB (experts e of the top-8)
    x'  = sum_j p_j W2[e_j] . (silu(g_j) * u_j)   8 x [2048 x 768] 25.2 MB

Each step's rows x k steps are split evenly over the programs (stream-K: a program's range may start and end inside
a row tile; partial sums go out by fp32 atomics), so every program streams the same bytes. Ways to run the same
steps, timed as CUDA graphs over `--layers` layers with their own weights (nothing reused from L2):

- `launches`: one Triton launch per step (6 a layer), one program per multiprocessor, with and without
  programmatic dependent launch; each step alone too;
- `persistent`: one Triton launch for all layers, a grid-wide barrier between steps; and the same with each
  program asking L2 for its weights of the steps ahead before each barrier;
- `Gluon ring` (`decode_layer_gluon.py`, Triton 3.6 on Hopper): one warp-specialised launch whose producer warp
  streams every step's weight tiles into a shared-memory ring while the consumers compute, with the same barriers;
  also timed without waiting at the barriers, with consumers that only take the tiles (the stream's own rate),
  and with a producer that loads nothing (the consumers' own rate, taken apart by `decode_layer_gluon.run`'s
  ablations); these timing-only rows give wrong results;
- `MMA consumers`: the same ring with the GEMVs on the tensor cores, and its options (`decode_layer_gluon.run`):
  the router's choice by ranks (`fast top-k`), side buffers for the next layer's first qkv tiles, barriers polled
  by loads, gate/up's units drawn from a counter, and a cap on each program's loads in flight; `--rings` sweeps
  ring depth, side buffers and the cap. For the first `--rings` entry also: `real attention` (GQA decode over a
  KV cache of CONTEXT tokens plus the new one, in place of the stand-in GEMV), `fixed-order sums` (partial sums
  to slots of their own rather than fp32 atomics; a rerun is checked bit-equal), and `whole layer` (a
  Qwen3-MoE decoder layer: the norms' weights, the residual stream, per-head q/k norms, rotary embedding and the
  KV store, checked against a torch version of the layer);
- `traced`: the MMA ring with the GPU timer read at each step's end and barrier (`decode_layer_gluon.trace_report`:
  each step's time, each barrier's skew and latency, the producer's wait for the router's choice), for the base
  ring, the first `--rings` entry, and a producer that loads nothing (the barriers unloaded);
- the MoE alone: the engine's `fused_moe` (its M=1 table entry) against the ring running only gate/up and down.

`--only REGEX` runs the variants whose names match (and the steps alone / the MoE rows / the traces if it matches
"step" / "MoE" / "trace").

Reported: µs a layer, the floor (weight bytes over the copy rate measured here; real attention's KV read is the
stand-in's bytes), and their ratio. A check against torch (fp32, the kernel's own expert choices) guards the
arithmetic. Without `fixed-order sums` fp32 atomics make the sums' order vary run to run. A probe: no paged cache,
one shape, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_attention import copy_bandwidth_tbs  # noqa: E402
from read_bw_probe import graph_us  # noqa: E402

BF16 = torch.bfloat16
HID, QKV, KVS, ATT, EXPERTS, TOP_K, INTER = 2048, 5120, 256, 4096, 128, 8, 768
BN, BK = 64, 128
# The same as constexprs, for the kernels.
_HID, _QKV, _KVS, _ATT = tl.constexpr(HID), tl.constexpr(QKV), tl.constexpr(KVS), tl.constexpr(ATT)
_EXPERTS, _TOP_K, _INTER = tl.constexpr(EXPERTS), tl.constexpr(TOP_K), tl.constexpr(INTER)
_BN, _BK = tl.constexpr(BN), tl.constexpr(BK)
# Real attention (the Gluon ring's `attention` option): GQA over a KV cache of CONTEXT past tokens plus the new one,
# KV_HEADS heads of HEAD_DIM, ATT // HEAD_DIM query heads; split into (head, 64-token chunk) units whose partial
# maxima, sums and outputs go to the workspace's am, al and ao, merged by the o step.
CONTEXT, KV_HEADS, HEAD_DIM, CHUNK_TOKENS = 1024, 4, 128, 64
ROPE_THETA, EPS = 1e6, 1e-6  # Qwen3-30B-A3B's
ATT_UNITS = KV_HEADS * CONTEXT // CHUNK_TOKENS
Q_HEADS = ATT // HEAD_DIM
assert QKV == ATT + 2 * KV_HEADS * HEAD_DIM
# The Gluon ring's fixed-order sums (`det`): each step's output as partial sums in slots of their own, one a
# program that contributes to a row tile, summed in slot order by the step that reads them. (output, size, slots)
# Slots: the most programs that share a row tile of that output at 128-144 programs (`decode_layer_gluon.run`
# checks the launch's).
DET_OUTPUTS = (("qkv", QKV, 3), ("a", ATT, 2), ("o", HID, 5), ("r", EXPERTS, 16), ("gu", TOP_K * 2 * INTER, 2),
               ("x", HID, 5))
# Workspace per layer (fp32): qkv, a, o, router logits, gate/up sums, x' (the next layer's input), expert ids and
# their probabilities; a whole layer's residual stream (its input, and h = input + o); the attention's partials; the
# fixed-order sums' slots.
OFFS = {}
_at = 0
for _name, _size in (("qkv", QKV), ("a", ATT), ("o", HID), ("r", EXPERTS), ("gu", TOP_K * 2 * INTER), ("x", HID),
                     ("ids", TOP_K), ("p", TOP_K), ("xin", HID), ("h", HID), ("am", ATT_UNITS * Q_HEADS // KV_HEADS),
                     ("al", ATT_UNITS * Q_HEADS // KV_HEADS), ("ao", ATT_UNITS * Q_HEADS // KV_HEADS * HEAD_DIM),
                     *((f"{name}_p", slots * size) for name, size, slots in DET_OUTPUTS)):
    OFFS[_name] = _at
    _at += _size
WS = _at
_WS = tl.constexpr(WS)
_OFF_IDS = tl.constexpr(OFFS["ids"])


@triton.jit
def _nap():
    tl.inline_asm_elementwise("nanosleep.u32 32; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _grid_sync(bar_ptr, target):
    """Wait until all programs have arrived target // programs times in all (a counter that only grows)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release")
    while tl.load(bar_ptr, volatile=True) < target:
        _nap()
    tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _inv_rms(x_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N), cache_modifier=".cg")
    return 1.0 / tl.sqrt(tl.sum(x * x) / N + 1e-6)


@triton.jit
def _units(pid, nprog, total):
    """Program pid's share [u0, u1) of total units (row tile x k step), split evenly: stream-K."""
    return pid * total // nprog, (pid + 1) * total // nprog


@triton.jit
def _gemv(w_ptr, x_ptr, y_ptr, scale, pid, nprog, N_TILES: tl.constexpr, K: tl.constexpr, ids_ptr=None,
          EXPERT_TILES: tl.constexpr = 0):
    """y[:N] += W[N, K] . (x[:K] * scale), W bf16 row-major, x and y fp32; the program's share of the
    N_TILES x (K / BK) units, a row tile at a time (its k steps pipelined), each tile's sum out by atomics.
    EXPERT_TILES: W holds experts of EXPERT_TILES row tiles each, and row tile t is tile t % EXPERT_TILES of expert
    ids[t // EXPERT_TILES] (gate/up over the chosen experts)."""
    KSTEPS: tl.constexpr = K // _BK
    u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
    offs_n = tl.arange(0, _BN)
    offs_k = tl.arange(0, _BK)
    for t in range(u0 // KSTEPS, tl.cdiv(u1, KSTEPS)):
        if EXPERT_TILES:
            e = tl.load(ids_ptr + t // EXPERT_TILES).to(tl.int64)
            row0 = e * (EXPERT_TILES * _BN) + (t % EXPERT_TILES) * _BN
        else:
            row0 = t * _BN
        acc = tl.zeros([_BN, 16], tl.float32)
        w_ptrs = w_ptr + (row0 + offs_n)[:, None].to(tl.int64) * K + offs_k[None, :]
        for ks in range(tl.maximum(u0 - t * KSTEPS, 0), tl.minimum(u1 - t * KSTEPS, KSTEPS)):
            xv = tl.load(x_ptr + ks * _BK + offs_k, cache_modifier=".cg") * scale
            acc = tl.dot(tl.load(w_ptrs + ks * _BK), tl.broadcast_to(xv[:, None], (_BK, 16)).to(tl.bfloat16), acc)
        tl.atomic_add(y_ptr + t * _BN + offs_n, tl.sum(acc, axis=1) / 16, sem="relaxed")


@triton.jit
def _down(w2_ptr, gu_ptr, y_ptr, ids_ptr, p_ptr, pid, nprog):
    """y += sum_j p_j W2[ids[j]] . (silu(g_j) * u_j): a row tile's k steps run over the 8 experts' 768 channels
    in turn."""
    STEPS_E: tl.constexpr = _INTER // _BK
    KSTEPS: tl.constexpr = _TOP_K * STEPS_E
    u0, u1 = _units(pid, nprog, (_HID // _BN) * KSTEPS)
    offs_n = tl.arange(0, _BN)
    offs_k = tl.arange(0, _BK)
    for t in range(u0 // KSTEPS, tl.cdiv(u1, KSTEPS)):
        acc = tl.zeros([_BN, 16], tl.float32)
        rows = (t * _BN + offs_n)[:, None] * _INTER
        for ks in range(tl.maximum(u0 - t * KSTEPS, 0), tl.minimum(u1 - t * KSTEPS, KSTEPS)):
            j = ks // STEPS_E
            c = (ks % STEPS_E) * _BK + offs_k
            e = tl.load(ids_ptr + j).to(tl.int64)
            w = tl.load(w2_ptr + e * _HID * _INTER + rows + c[None, :])
            g = tl.load(gu_ptr + j * 2 * _INTER + c, cache_modifier=".cg")
            up = tl.load(gu_ptr + j * 2 * _INTER + _INTER + c, cache_modifier=".cg")
            act = g * tl.sigmoid(g) * up * tl.load(p_ptr + j)
            acc = tl.dot(w, tl.broadcast_to(act[:, None], (_BK, 16)).to(tl.bfloat16), acc)
        tl.atomic_add(y_ptr + t * _BN + offs_n, tl.sum(acc, axis=1) / 16, sem="relaxed")


@triton.jit
def _top_k(r_ptr, ids_ptr, p_ptr):
    """ids, p = the top-8 router logits' experts and their softmax over the 8. Every program computes them and
    stores the same values, so any program may read them back."""
    offs = tl.arange(0, _EXPERTS)
    r0 = tl.load(r_ptr + offs, cache_modifier=".cg")
    best = tl.max(r0)
    r = r0
    total = 0.0
    for _ in tl.static_range(_TOP_K):
        total += tl.exp(tl.max(r) - best)
        r = tl.where(offs == tl.argmax(r, axis=0), float("-inf"), r)
    r = r0
    for j in tl.static_range(_TOP_K):
        e = tl.argmax(r, axis=0)
        tl.store(ids_ptr + j, e.to(tl.float32))
        tl.store(p_ptr + j, tl.exp(tl.max(r) - best) / total)
        r = tl.where(offs == e, float("-inf"), r)
    tl.debug_barrier()


@triton.jit
def _step(s, ws_ptr, x_ptr, wqkv, wkv, wo, wr, w13, w2, pid, nprog):
    """Step s (0-5) of one layer; x_ptr: the layer's input, ws_ptr: its workspace (fp32)."""
    qkv = ws_ptr + 0
    a = ws_ptr + _QKV
    o = a + _ATT
    r = o + _HID
    gu = r + _EXPERTS
    y = gu + _TOP_K * 2 * _INTER
    ids = y + _HID
    p = ids + _TOP_K
    if s == 0:
        _gemv(wqkv, x_ptr, qkv, _inv_rms(x_ptr, _HID), pid, nprog, _QKV // _BN, _HID)
    elif s == 1:
        _gemv(wkv, qkv, a, 1.0, pid, nprog, _ATT // _BN, _KVS)
    elif s == 2:
        _gemv(wo, a, o, 1.0, pid, nprog, _HID // _BN, _ATT)
    elif s == 3:
        _gemv(wr, o, r, _inv_rms(o, _HID), pid, nprog, _EXPERTS // _BN, _HID)
    elif s == 4:
        _top_k(r, ids, p)
        _gemv(w13, o, gu, _inv_rms(o, _HID), pid, nprog, _TOP_K * 2 * _INTER // _BN, _HID, ids, 2 * _INTER // _BN)
    else:
        _down(w2, gu, y, ids, p, pid, nprog)


@triton.jit
def _prefetch_rows(row_ptrs, nbytes):
    """Ask L2 for nbytes (a multiple of 16, > 0) from each of row_ptrs (16-byte aligned): Hopper's bulk prefetch,
    no registers or shared memory held, nothing waited for."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                              [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_gemv(w_ptr, pid, nprog, N_TILES: tl.constexpr, K: tl.constexpr):
    """`_gemv`'s weight bytes for program pid, into L2."""
    KSTEPS: tl.constexpr = K // _BK
    u0, u1 = _units(pid, nprog, N_TILES * KSTEPS)
    offs_n = tl.arange(0, _BN)
    for t in range(u0 // KSTEPS, tl.cdiv(u1, KSTEPS)):
        k_lo = tl.maximum(u0 - t * KSTEPS, 0)
        k_hi = tl.minimum(u1 - t * KSTEPS, KSTEPS)
        rows = w_ptr + (t * _BN + offs_n).to(tl.int64) * K + k_lo * _BK
        _prefetch_rows(rows, tl.zeros([_BN], tl.int32) + (k_hi - k_lo) * _BK * 2)


@triton.jit
def _prefetch_down(w2_ptr, ids_ptr, pid, nprog):
    """`_down`'s weight bytes for program pid, into L2 (the experts are known: gate/up has run)."""
    STEPS_E: tl.constexpr = _INTER // _BK
    KSTEPS: tl.constexpr = _TOP_K * STEPS_E
    u0, u1 = _units(pid, nprog, (_HID // _BN) * KSTEPS)
    offs_n = tl.arange(0, _BN)
    for t in range(u0 // KSTEPS, tl.cdiv(u1, KSTEPS)):
        k_lo = tl.maximum(u0 - t * KSTEPS, 0)
        k_hi = tl.minimum(u1 - t * KSTEPS, KSTEPS)
        for j in tl.static_range(_TOP_K):
            lo = tl.maximum(k_lo, j * STEPS_E)
            hi = tl.minimum(k_hi, (j + 1) * STEPS_E)
            if lo < hi:
                e = tl.load(ids_ptr + j).to(tl.int64)
                rows = w2_ptr + (e * _HID + t * _BN + offs_n) * _INTER + (lo - j * STEPS_E) * _BK
                _prefetch_rows(rows, tl.zeros([_BN], tl.int32) + (hi - lo) * _BK * 2)


@triton.jit
def _persistent_kernel(ws_ptr, x0_ptr, bar_ptr, wqkv, wkv, wo, wr, w13, w2, layers, PREFETCH: tl.constexpr):
    """Every step of every layer, a grid barrier after each. PREFETCH: before each barrier, a program asks L2
    for its weights of the steps ahead that do not wait on the router (after qkv: the KV stand-in's and o's;
    after the KV stand-in: the router's; after gate/up: down's; after down: the next layer's qkv), so that HBM
    keeps streaming through the barriers and the small steps."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    x_ptr = x0_ptr
    n = 0
    for layer in range(layers):
        lay = layer.to(tl.int64)
        ws = ws_ptr + lay * _WS
        for s in tl.static_range(6):
            _step(s, ws, x_ptr, wqkv + lay * _QKV * _HID, wkv + lay * _ATT * _KVS, wo + lay * _HID * _ATT,
                  wr + lay * _EXPERTS * _HID, w13 + lay * _EXPERTS * 2 * _INTER * _HID,
                  w2 + lay * _EXPERTS * _HID * _INTER, pid, nprog)
            if PREFETCH:
                if s == 0:
                    _prefetch_gemv(wkv + lay * _ATT * _KVS, pid, nprog, _ATT // _BN, _KVS)
                    _prefetch_gemv(wo + lay * _HID * _ATT, pid, nprog, _HID // _BN, _ATT)
                elif s == 1:
                    _prefetch_gemv(wr + lay * _EXPERTS * _HID, pid, nprog, _EXPERTS // _BN, _HID)
                elif s == 4:
                    _prefetch_down(w2 + lay * _EXPERTS * _HID * _INTER, ws + _OFF_IDS, pid, nprog)
                elif s == 5:
                    if layer + 1 < layers:
                        _prefetch_gemv(wqkv + (lay + 1) * _QKV * _HID, pid, nprog, _QKV // _BN, _HID)
            n += 1
            _grid_sync(bar_ptr, n * nprog)
        x_ptr = ws + _QKV + _ATT + _HID + _EXPERTS + _TOP_K * 2 * _INTER


@triton.jit
def _step_kernel(ws_ptr, x_ptr, wqkv, wkv, wo, wr, w13, w2, S: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _step(S, ws_ptr, x_ptr, wqkv, wkv, wo, wr, w13, w2, tl.program_id(0), tl.num_programs(0))


# The workspace's float offsets, as the kernels lay them out (checked against OFFS at import).
assert OFFS["x"] == QKV + ATT + HID + EXPERTS + TOP_K * 2 * INTER and OFFS["p"] == OFFS["ids"] + TOP_K


class Layers:
    """`layers` layers of random weights (bf16, scaled so activations stay near 1) and their workspace."""

    def __init__(self, layers: int, device: str) -> None:
        g = torch.Generator(device=device).manual_seed(0)

        def w(*shape: int) -> torch.Tensor:  # a layer at a time: 48 layers' fp32 draws at once do not fit
            out = torch.empty(*shape, dtype=BF16, device=device)
            for layer in range(shape[0]):
                out[layer] = (torch.randn(*shape[1:], generator=g, device=device) / shape[-1] ** 0.5).to(BF16)
            return out

        self.layers = layers
        self.wqkv, self.wkv, self.wo = w(layers, QKV, HID), w(layers, ATT, KVS), w(layers, HID, ATT)
        self.wr = w(layers, EXPERTS, HID)
        self.w13, self.w2 = w(layers, EXPERTS, 2 * INTER, HID), w(layers, EXPERTS, HID, INTER)
        # The KV cache, [layer, kv head, token, dim] (contiguous per head: the engine's is paged): CONTEXT past
        # tokens, and a row for the new token's k and v (written by the runs of a whole layer, `full`).
        self.k_cache = torch.randn(layers, KV_HEADS, CONTEXT + 1, HEAD_DIM, generator=g, device=device).to(BF16)
        self.v_cache = torch.randn(layers, KV_HEADS, CONTEXT + 1, HEAD_DIM, generator=g, device=device).to(BF16)
        # A whole layer's norm weights (`full`): the input and post-attention RMSNorms, the per-head q and k norms.
        self.w_in, self.w_post = (1 + 0.1 * torch.randn(2, layers, HID, generator=g, device=device)).to(BF16)
        self.w_q, self.w_k = (1 + 0.1 * torch.randn(2, layers, HEAD_DIM, generator=g, device=device)).to(BF16)
        self.pos = torch.full((1,), CONTEXT, dtype=torch.int32, device=device)  # the new token's position
        self.attention = False  # the reference's second step: set by the runs with real attention
        self.full = False  # the reference is a whole Qwen3-MoE layer: set by the runs with `full`
        self.det_sum = None  # set by the runs with fixed-order sums: layer -> its output, from its partial slots
        self.x0 = torch.randn(HID, generator=g, device=device)
        self.ws = torch.zeros(layers, WS, device=device)
        self.bar = torch.zeros(1, dtype=torch.int32, device=device)

    def weight_bytes_per_layer(self) -> int:
        dense = (QKV * HID + ATT * KVS + HID * ATT + EXPERTS * HID) * 2
        return dense + TOP_K * (2 * INTER * HID + HID * INTER) * 2

    def weights(self, layer: int | None = None) -> tuple:
        ws = (self.wqkv, self.wkv, self.wo, self.wr, self.w13, self.w2)
        return ws if layer is None else tuple(t[layer] for t in ws)

    def run_persistent(self, programs: int, prefetch: bool = False) -> None:
        self.attention, self.det_sum, self.full = False, None, False
        self.ws.zero_()
        self.bar.zero_()
        _persistent_kernel[(programs,)](self.ws, self.x0, self.bar, *self.weights(), self.layers,
                                        PREFETCH=prefetch, num_warps=4, num_stages=4)

    def run_launches(self, programs: int, pdl: bool, steps: tuple[int, ...] = tuple(range(6)),
                     zero: bool = True) -> None:
        """One launch per step of each layer (only `steps`, for a step's own time: then the inputs are whatever
        the workspace holds, and zero=False keeps them)."""
        self.attention, self.det_sum, self.full = False, None, False
        if zero:
            self.ws.zero_()
        x = self.x0
        for layer in range(self.layers):
            for s in steps:
                kw = dict(launch_pdl=True) if pdl else {}
                _step_kernel[(programs,)](self.ws[layer], x, *self.weights(layer), S=s, USE_PDL=pdl, num_warps=4,
                                          num_stages=4, **kw)
            x = self.ws[layer, OFFS["x"]:OFFS["x"] + HID]

    def fused_moe_calls(self):
        """A function running each layer's MoE by `moeserve.kernels.fused_moe` (nothing else) on the workspace's o
        (rms-normalised, bf16) and the experts and probabilities it holds now."""
        from moeserve.kernels import fused_moe

        inputs = []
        for layer in range(self.layers):
            ws = self.ws[layer]
            o = ws[OFFS["o"]:OFFS["o"] + HID]
            x = (o / torch.sqrt((o * o).mean() + 1e-6)).to(BF16)[None]
            ids = ws[OFFS["ids"]:OFFS["ids"] + TOP_K].to(torch.int32)[None]
            inputs.append((x, self.w13[layer], self.w2[layer], ws[OFFS["p"]:OFFS["p"] + TOP_K][None].clone(), ids))

        def run() -> None:
            for args in inputs:
                fused_moe(*args)

        return run

    def engine_stack(self, stages: int | None = None, cap: int | None = None, block: int = 16,
                     cap_gu: int | None = None, module=None):
        """The engine's decode stack (`moeserve.kernels.decode_stack_gluon`, the whole layer over a paged KV cache)
        on these layers' weights: a function of an optional trace tensor that runs it and returns the residual
        stream after the last layer, with CONTEXT past tokens in pages of `block` tokens (a cache of its own,
        random; the table maps them in order); stages, cap, cap_gu: its ring's, if not the engine's; module:
        another version of the kernel's module (`decode_stack_ab.py`). Its results are not checked here (the
        engine's GPU tests check them against transformers)."""
        from moeserve.kernels import decode_stack_gluon
        from moeserve.layers.rotary import rope_inv_freq

        DecodeStack = (module or decode_stack_gluon).DecodeStack  # noqa: N806 - the class

        weights = [self.wqkv.view(-1, HID), self.wo.view(-1, ATT), self.wr.view(-1, HID), self.w13.view(-1, HID),
                   self.w2.view(-1, INTER)]
        norms = [t.reshape(-1) for t in (self.w_in, self.w_post, self.w_q, self.w_k)]
        device = self.x0.device
        stack = DecodeStack(weights, norms, rope_inv_freq(HEAD_DIM, ROPE_THETA, None)[0].to(device))
        blocks = -(-(CONTEXT + 1) // block)
        g = torch.Generator(device=device).manual_seed(1)
        k_all, v_all = (torch.randn(self.layers * blocks * block, KV_HEADS * HEAD_DIM, generator=g,
                                    device=device).to(BF16) for _ in range(2))
        stack.bind_kv(k_all, v_all, block)
        stack.STAGES, stack.CAP = stages or stack.STAGES, cap or stack.CAP
        if cap_gu:
            stack.CAP_GU = cap_gu
        table = torch.arange(blocks, dtype=torch.int32, device=device)[None]
        pos = torch.full((1,), CONTEXT, dtype=torch.int64, device=device)
        return lambda trace=None: stack.launch(self.x0, pos, pos, table, trace)

    def step_bytes(self, s: int) -> int:
        """Weight bytes step s reads a layer."""
        return 2 * (QKV * HID, ATT * KVS, HID * ATT, EXPERTS * HID, TOP_K * 2 * INTER * HID, TOP_K * HID * INTER)[s]

    def output(self, layer: int) -> torch.Tensor:
        """Layer's output x' as the last run left it (a whole layer, `full`: the residual h plus the MoE's)."""
        y = self.det_sum(layer) if self.det_sum is not None else self.ws[layer, OFFS["x"]:OFFS["x"] + HID]
        return self.ws[layer, OFFS["h"]:OFFS["h"] + HID] + y if self.full else y

    def max_layer_error(self) -> float:
        """The largest relative error of a layer's output x' against fp32 torch ops on the kernel's own input to
        that layer, with the experts and probabilities the kernel chose."""
        worst = 0.0
        for layer in range(self.layers):
            x = self.x0 if layer == 0 else self.output(layer - 1)
            ref = self._reference_layer(layer, x.float())
            got = self.output(layer)
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
        return worst

    def _reference_attention(self, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                             v_new: torch.Tensor) -> torch.Tensor:
        """Each query head's softmax(q . K / sqrt(d)) . V (fp32) over the cache's CONTEXT tokens and the new one
        (q [Q_HEADS, HEAD_DIM], k_new and v_new [KV_HEADS, HEAD_DIM]): the flattened attention output."""
        k = torch.cat([self.k_cache[layer, :, :CONTEXT].float(), k_new[:, None]], dim=1)
        v = torch.cat([self.v_cache[layer, :, :CONTEXT].float(), v_new[:, None]], dim=1)
        p = torch.softmax(q.view(KV_HEADS, -1, HEAD_DIM) @ k.transpose(1, 2) / HEAD_DIM ** 0.5, dim=-1)
        return (p @ v).reshape(-1)

    def _reference_moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE on its (normalised) input x, with the experts and probabilities the kernel chose."""
        _, _, _, _, w13, w2 = self.weights(layer)
        ws = self.ws[layer]
        ids = ws[OFFS["ids"]:OFFS["ids"] + TOP_K].long()
        p = ws[OFFS["p"]:OFFS["p"] + TOP_K]
        y = torch.zeros(HID, device=x.device)
        for j in range(TOP_K):
            gu = w13[ids[j]].float() @ x
            y += w2[ids[j]].float() @ (torch.nn.functional.silu(gu[:INTER]) * gu[INTER:] * p[j]).to(BF16).float()
        return y

    def _reference_full_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A Qwen3-MoE decoder layer at position CONTEXT, rounded to bf16 where transformers' is (the project's
        references: `rms_norm_reference`, `rope_reference` with the per-head norms), with the experts and
        probabilities the kernel chose; also checks the KV store of the new token."""
        from moeserve.kernels.norm import rms_norm_reference
        from moeserve.kernels.rope import rope_reference
        from moeserve.layers.rotary import rope_inv_freq

        wqkv, _, wo, _, _, _ = self.weights(layer)
        wqkv, wo = wqkv.float(), wo.float()

        def norm(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return rms_norm_reference(v.to(BF16), w, EPS).float()

        qkv = (wqkv @ norm(x, self.w_in[layer])).to(BF16)
        kv = KV_HEADS * HEAD_DIM
        q, k_new = rope_reference(qkv[:ATT].view(1, -1, HEAD_DIM), qkv[ATT:ATT + kv].view(1, -1, HEAD_DIM),
                                  torch.full((1,), CONTEXT, device=x.device),
                                  rope_inv_freq(HEAD_DIM, ROPE_THETA, None)[0].to(x.device),
                                  q_norm_weight=self.w_q[layer], k_norm_weight=self.w_k[layer], eps=EPS)
        k_new, v_new = k_new[0].float(), qkv[ATT + kv:].view(KV_HEADS, HEAD_DIM).float()
        stored = (self.k_cache[layer, :, CONTEXT].float(), self.v_cache[layer, :, CONTEXT].float())
        for got, want in zip(stored, (k_new, v_new)):
            if ((got - want).norm() / want.norm()).item() > 1e-2:
                raise AssertionError(f"layer {layer}: the new token's k or v in the cache is off")
        att = self._reference_attention(layer, q[0].float(), k_new, v_new)
        h = x + wo @ att.to(BF16).float()
        return h + self._reference_moe(layer, norm(h, self.w_post[layer]))

    def _reference_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.full:
            return self._reference_full_layer(layer, x)
        wqkv, wkv, wo, _, _, _ = self.weights(layer)
        wqkv, wkv, wo = wqkv.float(), wkv.float(), wo.float()

        def rms(v: torch.Tensor) -> torch.Tensor:
            return v / torch.sqrt((v * v).mean() + 1e-6)

        def bf(v: torch.Tensor) -> torch.Tensor:
            return v.to(BF16).float()

        qkv = wqkv @ bf(rms(x))
        if self.attention:
            k_new, v_new = bf(qkv[ATT:]).view(2, KV_HEADS, HEAD_DIM)
            o = wo @ bf(self._reference_attention(layer, bf(qkv[:ATT]).view(-1, HEAD_DIM), k_new, v_new))
        else:
            o = wo @ bf(wkv @ bf(qkv[:KVS]))
        return self._reference_moe(layer, bf(rms(o)))


def xcompile(out_dir: str) -> None:
    """Build the probe's kernels for sm_90a without a GPU (`xcompile.py`; Triton 3.6 with a CPU torch) and print
    what the GPU's compile would: registers, spills, shared memory, pipelined copies, TMA loads."""
    from xcompile import compile_sm90, ptxas_report, summary

    os.makedirs(out_dir, exist_ok=True)
    shapes = dict(wqkv=(QKV, HID), wkv=(ATT, KVS), wo=(HID, ATT), wr=(EXPERTS, HID), w13=(2 * INTER, HID),
                  w2=(HID, INTER))
    weights = {name: torch.empty(*shape, dtype=BF16) for name, shape in shapes.items()}
    f32, i32 = torch.empty(WS, dtype=torch.float32), torch.empty(4, dtype=torch.int32)
    kernels = [(f"persistent, PREFETCH={p}", _persistent_kernel,
                dict(ws_ptr=f32, x0_ptr=f32, bar_ptr=i32, **weights, layers=8), dict(PREFETCH=p)) for p in (0, 1)]
    kernels += [(f"step {s}", _step_kernel, dict(ws_ptr=f32, x_ptr=f32, **weights), dict(S=s, USE_PDL=True))
                for s in range(6)]
    import decode_layer_gluon

    if decode_layer_gluon.gluon is not None:
        cache = torch.empty(KV_HEADS * (CONTEXT + 1), HEAD_DIM, dtype=BF16)
        norm_w = torch.empty(HID, dtype=BF16)
        descs = {f"d_{n}": decode_layer_gluon.host_descriptor(w, [decode_layer_gluon.ROWS, decode_layer_gluon.TILE])
                 for n, w in zip(("qkv", "kv", "o", "r", "13", "2", "kc", "vc"), (*weights.values(), cache, cache))}
        ring = decode_layer_gluon._layer_ring_kernel
        i64 = torch.empty(4, dtype=torch.int64)
        plain = dict(NWG=1, MOE_ONLY=False, MMA=False, TRACE=False, FAST=False, SIDE=0, POLL=False, DRAWN=False,
                     CAP=0, ATTN=False, DET=False, FULL=False)
        ring_variants = {"": {}, "2 consumer warpgroups": dict(NWG=2), "MoE only": dict(MOE_ONLY=True),
                         "MMA": dict(MMA=True), "MMA, traced": dict(MMA=True, TRACE=True),
                         "MMA, fast top-k, 4 side buffers, polled barriers": dict(MMA=True, FAST=True, SIDE=4,
                                                                                  POLL=True),
                         "MMA, fast top-k, drawn gate/up": dict(MMA=True, FAST=True, DRAWN=True),
                         "MMA, fast top-k, 4 side buffers, 3 loads in flight": dict(MMA=True, FAST=True, SIDE=4,
                                                                                    CAP=3),
                         "MMA, fast top-k, 2 loads in flight, attention": dict(MMA=True, FAST=True, CAP=2,
                                                                              ATTN=True),
                         "MMA, fast top-k, 2 loads in flight, attention, fixed-order sums": dict(
                             MMA=True, FAST=True, CAP=2, ATTN=True, DET=True),
                         "MMA, fast top-k, 2 loads in flight, whole layer, fixed-order sums": dict(
                             MMA=True, FAST=True, CAP=2, ATTN=True, DET=True, FULL=True)}
        kernels += [(f"Gluon ring {name}", ring, dict(**descs, ws_ptr=f32, x0_ptr=f32, bar_ptr=i32, cnt_ptr=i32,
                                                       trace_ptr=i64, w_in=norm_w, w_post=norm_w, w_q=norm_w,
                                                       w_k=norm_w, k_cache=cache, v_cache=cache, pos_ptr=i32,
                                                       layers=8),
                     dict(STAGES=6, SYNC=True, COMPUTE=1, LOAD=1, **{**plain, **changes}))
                    for name, changes in ring_variants.items()]
        from moeserve.kernels import decode_stack_gluon as stack  # the engine's kernel, over a paged cache

        pages = torch.empty(8 * 66 * 16, KV_HEADS * HEAD_DIM, dtype=BF16)
        page_descs = {f"d_{n}": stack.host_descriptor(pages, [16, stack.TILE], layout_of=[stack.ROWS, stack.TILE])
                      for n in ("kc", "vc")}
        kernels += [("the engine's decode stack" + (", traced" if trace else ""), stack._stack_kernel,
                     dict(d_qkv=descs["d_qkv"], d_o=descs["d_o"], d_nx=descs["d_r"], d_ma=descs["d_o"],
                          d_13=descs["d_13"], d_2=descs["d_2"],
                          **page_descs, ws=f32, bar_ptr=i32, w_in=norm_w, w_post=norm_w, w_q=norm_w, w_k=norm_w,
                          k_cache=pages, v_cache=pages, inv_freq=torch.empty(HEAD_DIM // 2), pos_ptr=i64,
                          slot_ptr=i64, table_ptr=i32, width=66, cache_rows=66 * 16,
                          layer_elems=66 * 16 * KV_HEADS * HEAD_DIM, layers=8, trace_ptr=i64),
                     dict(STAGES=10, CAP=2, CAP_GU=3, BS=16, TRACE=trace)) for trace in (False, True)]
    for name, kernel, args, constexprs in kernels:
        compiled = compile_sm90(kernel, args, constexprs, num_warps=4, num_stages=None if "Gluon" in name else 4)
        ptx = os.path.join(out_dir, name.replace(" ", "_").replace("/", "-") + ".ptx")
        info = summary(compiled, ptxas_report(compiled, ptx))
        print(f"{name:<36} {info}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xcompile", metavar="DIR", help="only build the kernels for sm_90a here (no GPU)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stages", type=lambda t: [int(v) for v in t.split(",")], default=[12, 6],
                        help="ring depths of the Gluon variant (16 KB a stage)")
    parser.add_argument("--rings", type=lambda t: [tuple(int(v) for v in r.split(":")) for r in t.split(",")],
                        default=[(10, 0, 2), (11, 0, 2), (12, 0, 2), (9, 2, 2), (10, 0, 3), (12, 0, 3)],
                        help="stages:side:cap of the MMA ring with the fast top-k, each a variant (the first also "
                        "traced)")
    parser.add_argument("--only", default="", help="run only the variants whose name matches this regex (and "
                        "skip the steps alone, the MoE comparison and the traces unless it matches 'step' / 'MoE' / "
                        "'trace')")
    parser.add_argument("--out", default="benchmarks/out/decode_layer_probe.json")
    args = parser.parse_args()
    if args.xcompile:
        return xcompile(args.xcompile)
    copy = copy_bandwidth_tbs()
    m = Layers(args.layers, "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floor = m.weight_bytes_per_layer() / copy / 1e6
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, Triton {triton.__version__}; copy "
          f"{copy:.3f} TB/s; {m.weight_bytes_per_layer() / 1e6:.1f} MB of weights a layer, floor {floor:.1f} µs",
          flush=True)
    variants = {
        "persistent": lambda: m.run_persistent(sms),
        "persistent, L2 prefetch": lambda: m.run_persistent(sms, prefetch=True),
        "launches": lambda: m.run_launches(sms, False),
        "launches, PDL": lambda: m.run_launches(sms, True),
    }
    timing_only = {}  # wrong results: each starts from a whole run's workspace, so its experts are real ones
    import decode_layer_gluon  # it takes this module's shapes and workspace layout

    if decode_layer_gluon.available(torch.device("cuda")):
        for wgs in (1, 2):
            for stages in args.stages:
                variants[f"Gluon ring, {wgs} consumer warpgroups, {stages} stages"] = (
                    lambda stages=stages, wgs=wgs: decode_layer_gluon.run(m, sms, stages, warpgroups=wgs))
            timing_only[f"Gluon ring, {wgs} consumer warpgroups, no barrier waits"] = (
                lambda wgs=wgs: decode_layer_gluon.run(m, sms, sync=False, warpgroups=wgs))
        for stages in (6, 9):
            variants[f"Gluon ring, MMA consumers, {stages} stages"] = (
                lambda stages=stages: decode_layer_gluon.run(m, sms, stages, mma=True))
        mma_variants = {"fast top-k": dict(fast=True), "polled barriers": dict(poll=True),
                        "fast top-k, 4 side buffers": dict(fast=True, side=4),
                        "fast top-k, 5 side buffers": dict(fast=True, side=5),
                        "fast top-k, 4 side buffers, polled barriers": dict(fast=True, side=4, poll=True),
                        "drawn gate/up": dict(drawn=True), "fast top-k, drawn gate/up": dict(fast=True, drawn=True),
                        "fast top-k, 3 loads in flight": dict(fast=True, cap=3),
                        "fast top-k, 4 loads in flight": dict(fast=True, cap=4),
                        "fast top-k, 4 side buffers, 3 loads in flight": dict(fast=True, side=4, cap=3),
                        "fast top-k, 4 side buffers, 4 loads in flight": dict(fast=True, side=4, cap=4)}
        for what, kw in mma_variants.items():
            variants[f"Gluon ring, MMA consumers, 6 stages, {what}"] = (
                lambda kw=kw: decode_layer_gluon.run(m, sms, 6, mma=True, **kw))
        for stages, side, cap in args.rings:
            variants[f"Gluon ring, MMA consumers, fast top-k, ring {stages}:{side}:{cap} (stages:side:cap)"] = (
                lambda stages=stages, side=side, cap=cap: decode_layer_gluon.run(m, sms, stages, mma=True, fast=True,
                                                                                side=side, cap=cap))
        stages, side, cap = args.rings[0]
        for what, kw in {"real attention": dict(attention=True), "fixed-order sums": dict(det=True),
                         "real attention, fixed-order sums": dict(attention=True, det=True),
                         "whole layer": dict(attention=True, full=True),
                         "whole layer, fixed-order sums": dict(attention=True, full=True, det=True)}.items():
            variants[f"Gluon ring, MMA consumers, fast top-k, ring {stages}:{side}:{cap}, {what}"] = (
                lambda kw=kw: decode_layer_gluon.run(m, sms, stages, mma=True, fast=True, side=side, cap=cap, **kw))
        engine_stack = m.engine_stack()
        timing_only["the engine's decode stack (whole layer, fixed-order sums, pages of 16)"] = engine_stack
        timing_only["the engine's decode stack, pages of 64 (a tile a copy)"] = m.engine_stack(block=64)
        for stages, _, cap in args.rings[1:]:
            timing_only[f"the engine's decode stack, ring {stages}:{cap} (stages:cap)"] = m.engine_stack(stages, cap)
        timing_only["Gluon ring, MMA consumers, no barrier waits"] = (
            lambda: decode_layer_gluon.run(m, sms, 6, sync=False, mma=True))
        timing_only["Gluon ring, MMA consumers only (no weight loads), no barrier waits"] = (
            lambda: decode_layer_gluon.run(m, sms, 6, sync=False, load=0, mma=True))
        timing_only["Gluon ring, weights only"] = lambda: decode_layer_gluon.run(m, sms, sync=False, compute=0)
        timing_only["Gluon ring, weights only, 10 stages, 2 loads in flight"] = (
            lambda: decode_layer_gluon.run(m, sms, 10, sync=False, compute=0, cap=2))
        for mode, what in ((1, ""), (2, ", no barrier a tile"), (3, ", no input loads"), (4, ", neither")):
            timing_only[f"Gluon ring, consumers only (no weight loads), no barrier waits{what}"] = (
                lambda mode=mode: decode_layer_gluon.run(m, sms, sync=False, load=0, compute=mode))
        timing_only["Gluon ring, consumers only, 2 warpgroups, no barrier waits"] = (
            lambda: decode_layer_gluon.run(m, sms, sync=False, load=0, warpgroups=2))
        timing_only["Gluon ring, consumers only, 2 warpgroups, no barrier waits, no input loads"] = (
            lambda: decode_layer_gluon.run(m, sms, sync=False, load=0, warpgroups=2, compute=3))
        timing_only["Gluon ring, consumers only, no stage handshakes, no input loads"] = (
            lambda: decode_layer_gluon.run(m, sms, sync=False, load=2, compute=5))
        timing_only["Gluon ring, consumers only, the tiles alone (no handshakes, loads, norms, top-k, arrivals)"] = (
            lambda: decode_layer_gluon.run(m, sms, sync=False, load=2, compute=6))
    rows = []
    chosen = {name: fn for name, fn in {**variants, **timing_only}.items() if re.search(args.only, name)}
    for name, fn in chosen.items():
        if name in timing_only:
            m.run_persistent(sms)
        fn()
        torch.cuda.synchronize()
        err = float("nan") if name in timing_only else m.max_layer_error()
        if "fixed-order" in name:  # the point of it: a rerun gives the same bits
            first = m.ws.clone()
            fn()
            torch.cuda.synchronize()
            print(f"{name}: a rerun's workspace is bit-equal: {torch.equal(first, m.ws)}", flush=True)
        us = graph_us([fn]) / args.layers
        rows.append(dict(variant=name, us_per_layer=us, floor_us=floor, ratio=us / floor, rel_err=err))
        print(f"{name:<16} {us:8.1f} µs a layer  {us / floor:5.2f}x floor  worst layer's rel err {err:.1e}",
              flush=True)
    if decode_layer_gluon.available(torch.device("cuda")) and re.search(args.only, "trace"):
        # Where a layer's time goes in the MMA ring (6 stages, and the first of --rings): the GPU timer at each
        # step's end and barrier.
        trace = torch.zeros(args.layers, sms, decode_layer_gluon.MARKS, dtype=torch.int64, device="cuda")
        stages, side, cap = args.rings[0]
        traced = {"": dict(stages=6), f"fast top-k, ring {stages}:{side}:{cap}": dict(stages=stages, fast=True,
                                                                                     side=side, cap=cap),
                  f"fast top-k, ring {stages}:{side}:{cap}, whole layer": dict(
                      stages=stages, fast=True, side=side, cap=cap, attention=True, full=True),
                  f"fast top-k, ring {stages}:{side}:{cap}, real attention": dict(stages=stages, fast=True, side=side,
                                                                                   cap=cap, attention=True),
                  f"fast top-k, ring {stages}:{side}:{cap}, whole layer, fixed-order sums": dict(
                      stages=stages, fast=True, side=side, cap=cap, attention=True, full=True, det=True),
                  "no weight loads (timing only)": dict(stages=6, load=0)}

        def report(what: str) -> None:
            rows.extend(dict(variant=f"trace {what}: " + row["part"], **row)
                        for row in decode_layer_gluon.print_trace(trace))

        engine_stack(trace)
        torch.cuda.synchronize()
        print(f"traced the engine's decode stack: µs, mean over layers 1-{args.layers - 1}")
        report("the engine's decode stack")
        for what, kw in traced.items():
            if kw.get("load") == 0:
                m.run_persistent(sms)  # real experts in the workspace: the producer still reads them
            decode_layer_gluon.run(m, sms, mma=True, trace=trace, **kw)
            torch.cuda.synchronize()
            err = float("nan") if kw.get("load") == 0 else m.max_layer_error()
            print(f"traced {what}: worst layer's rel err {err:.1e}; µs, mean over layers 1-{args.layers - 1}")
            report(what)
    # What follows runs on a whole run's workspace (its experts, too): the timing-only variants leave junk.
    m.run_persistent(sms)
    torch.cuda.synchronize()
    for s in range(6) if re.search(args.only, "step") else ():  # each step alone, one launch a layer
        us = graph_us([lambda s=s: m.run_launches(sms, False, (s,), zero=False)]) / args.layers
        step_floor = m.step_bytes(s) / copy / 1e6
        rows.append(dict(variant=f"step {s} alone", us_per_layer=us, floor_us=step_floor, ratio=us / step_floor))
        print(f"step {s} alone     {us:8.1f} µs a layer  {us / step_floor:5.2f}x its floor ({step_floor:.1f} µs)",
              flush=True)
    # The MoE alone (gate/up and down on the workspace's o, experts and probabilities): the engine's fused_moe
    # (its Qwen3 M=1 table entry, two launches) against the ring, which streams down's weights behind gate/up's.
    moe_floor = (m.step_bytes(4) + m.step_bytes(5)) / copy / 1e6
    moe = {"fused_moe (the engine's M=1 path)": m.fused_moe_calls()}
    if decode_layer_gluon.available(torch.device("cuda")):
        moe["Gluon ring, gate/up and down only"] = lambda: decode_layer_gluon.run(m, sms, 6, moe_only=True)
        moe["Gluon ring, MMA consumers, gate/up and down only"] = (
            lambda: decode_layer_gluon.run(m, sms, 6, moe_only=True, mma=True))
    for name, fn in moe.items() if re.search(args.only, "MoE") else ():
        us = graph_us([fn]) / args.layers
        rows.append(dict(variant=name, us_per_layer=us, floor_us=moe_floor, ratio=us / moe_floor))
        print(f"{name:<36} {us:8.1f} µs a layer  {us / moe_floor:5.2f}x the MoE's floor ({moe_floor:.1f} µs)",
              flush=True)
    write_rows(args.out, copy, args.layers, rows)


def write_rows(path: str, copy: float, layers: int, rows: list[dict]) -> None:
    """A run's rows as JSON, with the card, the copy rate and the layer count."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), copy_tbs=copy, layers=layers, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
