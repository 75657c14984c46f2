"""Absorbed-MLA decode as a warp-specialised Gluon kernel (Hopper: TMA producer warp, two wgmma warpgroups).

Same computation and contract as `mla_decode.mla_decode_attention`: 64 query heads of one request (one split of
its context) per program, over the paged latent cache read 64 keys at a time. The Triton kernels leave the
schedule to Triton 3.6, which runs load -> QK^T -> softmax -> PV in lock-step in every warp, and a [64, 512]
fp32 accumulator leaves no registers to overlap them (benchmarks/RESULTS.md: 38% of the copy bandwidth).
Here the work is split between three partitions of one program:

- a producer warp streams the query rows once, then each key tile (latent halves [64, 256] and rope part
  [64, 64]) through two shared-memory stages by TMA;
- warpgroup 0 computes S = Q K^T over all 576 columns, the online softmax, hands P (bf16) and the row rescale
  factor to warpgroup 1 through shared memory, and accumulates O[:, :256] += P V[:, :256];
- warpgroup 1 accumulates O[:, 256:] += P V[:, 256:] from the shared P.

Each warpgroup holds one [64, 256] fp32 half of the output (128 registers per thread). A stage is freed when
both warpgroups' MMAs that read it have completed; P's buffer when warpgroup 1's have. Rows past the context in
a request's last tile come from the page's unused slots: their scores are masked, and each warpgroup zeroes its
value half of those rows before its PV, so stale cache contents (NaN included) never reach the output.

Requirements (`mla_gluon_unsupported` says which one fails): a Hopper GPU (sm_90), Triton 3.6 (Gluon's API still
changes between releases; the kernel was written and measured with 3.6), 16-bit q and cache of one dtype,
kv_lora_rank 512 and rope dim 64 (DeepSeek-V2/V3), a page size that is a multiple of 64, or 16 or 32 (a key
tile then takes one TMA box per page).
"""

from __future__ import annotations

import torch
import triton

from .gluon_support import (
    GL_DTYPES,
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

BLOCK_N = 64  # keys per tile
BLOCK_H = 64  # query heads per program: one wgmma M per warpgroup
LORA = 512
ROPE = 64
STAGES = 2  # 72 KB per key tile; q takes another 72 KB


def mla_gluon_unsupported(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> str | None:
    """Why the Gluon MLA decode kernel cannot take these inputs, or None when it can: the inputs' shapes and
    layout first (`mla_gluon_input_problem`), then the platform (Triton release, Hopper GPU)."""
    problem = mla_gluon_input_problem(q, kv_cache, kv_lora_rank)
    if problem is not None:
        return problem
    return gluon_platform_problem(q.device, "the Gluon MLA kernel")


def mla_gluon_input_problem(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> str | None:
    """What about q [R, H, LORA + ROPE] and kv_cache [blocks, page, 1, LORA + ROPE] the kernel cannot take, or
    None: 16-bit dtypes shared by both, DeepSeek's 512 + 64 latent, a page of 16, 32 or a multiple of 64 keys,
    and evenly spaced 16-byte aligned cache rows (TMA)."""
    if q.dtype not in GL_DTYPES or kv_cache.dtype != q.dtype:
        return f"q and kv_cache must share a 16-bit dtype (fp16/bf16), got {q.dtype} and {kv_cache.dtype}"
    if q.dim() != 3 or kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != q.shape[2]:
        return f"want q [R, H, D] and kv_cache [NB, page, 1, D], got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
    if kv_lora_rank != LORA or q.shape[2] != LORA + ROPE:
        rope = q.shape[2] - kv_lora_rank
        return f"kv_lora_rank must be {LORA} with a rope dim of {ROPE}, got {kv_lora_rank} and {rope}"
    page = kv_cache.shape[1]
    if page % BLOCK_N and (BLOCK_N % page or page < 16):
        return f"the page size must be a multiple of {BLOCK_N}, or 16 or 32, got {page}"
    if kv_cache.stride(-1) != 1 or kv_cache.stride(0) != page * kv_cache.stride(1):
        return "the cache needs a contiguous last dim and evenly spaced token rows"
    if (kv_cache.stride(1) * kv_cache.element_size()) % 16 or kv_cache.data_ptr() % 16:
        return "the cache's rows must start at 16-byte aligned addresses (TMA)"
    return None


if gluon is not None:
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _BLOCK_H = gl.constexpr(BLOCK_H)
    _ROPE = gl.constexpr(ROPE)
    _STAGES = gl.constexpr(STAGES)


    @gluon.jit
    def _loader(q_lat, q_rope, c_lat, c_rope, q0, q1, qr, k0, k1, kr, q_bar, ready, empty,
                BlockTables, stride_bt, req, q_row, start, end, n_tiles, PAGE: gl.constexpr):
        """Producer warp: the program's 64 query rows once, then each key tile into the next free stage, as
        one TMA box per page it spans (pages under 64 keys: c_lat / c_rope boxes of PAGE rows)."""
        HALF: gl.constexpr = q0.type.shape[1]
        SUB: gl.constexpr = c_lat.block_type.shape[0]  # rows per cache box: min(PAGE, BLOCK_N)
        tile_bytes: gl.constexpr = (_BLOCK_N // SUB) * (2 * c_lat.block_type.nbytes + c_rope.block_type.nbytes)
        mbarrier.expect(q_bar, 2 * q_lat.block_type.nbytes + q_rope.block_type.nbytes)
        tma.async_copy_global_to_shared(q_lat, [q_row, 0], q_bar, q0)
        tma.async_copy_global_to_shared(q_lat, [q_row, HALF], q_bar, q1)
        tma.async_copy_global_to_shared(q_rope, [q_row, 2 * HALF], q_bar, qr)
        table = BlockTables + req * stride_bt
        for t in range(n_tiles):
            # The tile's rows (a page's first row per box; up to four boxes, pages of 16 keys and more) are read
            # from the block table before the wait for a free stage, so the table's latency hides behind it.
            n0 = start + t * _BLOCK_N
            r0 = _page_row(table, n0, end, PAGE)
            r1 = _page_row(table, n0 + SUB, end, PAGE)
            r2 = _page_row(table, n0 + 2 * SUB, end, PAGE)
            r3 = _page_row(table, n0 + 3 * SUB, end, PAGE)
            s = t % _STAGES
            # A fresh barrier counts as having completed the phase before phase 0: round 0 passes at once.
            mbarrier.wait(empty.index(s), ((t // _STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, tile_bytes)
            _load_box(c_lat, c_rope, k0, k1, kr, s, bar, r0, 0, SUB)
            if SUB < _BLOCK_N:
                _load_box(c_lat, c_rope, k0, k1, kr, s, bar, r1, 1, SUB)
            if 2 * SUB < _BLOCK_N:
                _load_box(c_lat, c_rope, k0, k1, kr, s, bar, r2, 2, SUB)
                _load_box(c_lat, c_rope, k0, k1, kr, s, bar, r3, 3, SUB)

    @gluon.jit
    def _page_row(table, n, end, PAGE: gl.constexpr):
        """Row of token n in the cache's [blocks * PAGE, D] view. Tokens past the context read its last page
        again (the table may end there); their keys are masked."""
        n = gl.minimum(n, end - 1)
        return gl.load(table + n // PAGE) * PAGE + n % PAGE

    @gluon.jit
    def _load_box(c_lat, c_rope, k0, k1, kr, s, bar, row, j: gl.constexpr, SUB: gl.constexpr):
        """TMA rows row ... row + SUB - 1 (one page's part of a key tile) into rows j * SUB ... of stage s."""
        HALF: gl.constexpr = k0.type.shape[2]
        tma.async_copy_global_to_shared(c_lat, [row, 0], bar, k0.index(s).slice(j * SUB, SUB))
        tma.async_copy_global_to_shared(c_lat, [row, HALF], bar, k1.index(s).slice(j * SUB, SUB))
        tma.async_copy_global_to_shared(c_rope, [row, 2 * HALF], bar, kr.index(s).slice(j * SUB, SUB))

    @gluon.jit
    def _zero_tail(buf, valid, num_warps: gl.constexpr):
        """Zero rows valid... of a [_BLOCK_N, HALF] value tile in shared memory (a request's last, partial tile),
        then make the stores visible to the tensor cores."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows = gl.arange(0, buf.type.shape[0], layout=gl.SliceLayout(1, layout))
        tile = buf.load(layout)
        buf.store(gl.where((rows < valid)[:, None], tile, gl.zeros_like(tile)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _store_half(o, inv_l, Out, PartOut, req, heads, h_ok, split, col0, stride_ot, stride_oh, stride_pt,
                    stride_ph, stride_ps, SPLIT_OUT: gl.constexpr, layout: gl.constexpr):
        """Write the normalised [64, HALF] output half at columns col0...: to Out, or to split's fp32 partial."""
        cols = col0 + gl.arange(0, o.type.shape[1], layout=gl.SliceLayout(0, layout))
        out = o * inv_l[:, None]
        if SPLIT_OUT:
            rows = PartOut + req * stride_pt + heads.to(gl.int64) * stride_ph + split * stride_ps
        else:
            rows = Out + req * stride_ot + heads.to(gl.int64) * stride_oh
        gl.store(rows[:, None] + cols[None, :], out.to(rows.dtype.element_ty), mask=h_ok[:, None])

    @gluon.jit
    def _qk(q0, q1, qr, k0, k1, kr, st, s_zero):
        """Issue S = Q K^T for the key tile in stage st (asynchronous; the caller waits)."""
        s = warpgroup_mma(q0, k0.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q1, k1.index(st).permute((1, 0)), s, is_async=True)
        return warpgroup_mma(qr, kr.index(st).permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _softmax_wg(q0, q1, qr, k0, k1, kr, p_smem, alpha_smem, q_bar, ready, empty, p_full, p_empty,
                    Out, PartOut, PartLse, req, split, head0, num_heads, start, end, n_tiles, scale_log2,
                    stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, SPLIT_OUT: gl.constexpr):
        """Warpgroup 0 (the default partition): S, online softmax, P to warpgroup 1, O[:, :HALF]."""
        HALF: gl.constexpr = q0.type.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_zero = gl.zeros([_BLOCK_H, _BLOCK_N], gl.float32, s_layout)
        o = gl.zeros([_BLOCK_H, HALF], gl.float32, o_layout)
        m_i = gl.full([_BLOCK_H], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([_BLOCK_H], gl.float32, row_s)
        cols = gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(q_bar, 0)
        for t in range(n_tiles):
            st = t % _STAGES
            mbarrier.wait(ready.index(st), (t // _STAGES) & 1)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(_qk(q0, q1, qr, k0, k1, kr, st, s_zero),))
            # s holds tile t's scores. Online softmax over them:
            valid = end - (start + t * _BLOCK_N)
            x = gl.where((cols < valid)[None, :], s * scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, axis=1))  # finite: a tile holds at least one key
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(x - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p16 = p.to(q0.dtype)
            # Hand P and the rescale factor to warpgroup 1 once it is done with the previous ones.
            mbarrier.wait(p_empty, (t & 1) ^ 1)
            p_smem.store(p16)
            alpha_smem.store(alpha)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(p_full)
            if valid < _BLOCK_N:
                _zero_tail(k0.index(st), valid, 4)
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            # Waited for at once: an MMA left in flight across iterations makes ptxas serialise every wgmma
            # (its warning C7514). Issuing the next tile's QK^T behind this PV measured slower (161 vs 141 us,
            # B64 context 4096, H200): it frees each stage one QK^T later.
            o = warpgroup_mma(gl.convert_layout(p16, p_layout), k0.index(st), o, is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(st))

        has_keys = l_i > 0.0
        inv_l = 1.0 / gl.where(has_keys, l_i, 1.0)
        # The final handoff: warpgroup 1 normalises its half by the same 1 / l.
        mbarrier.wait(p_empty, (n_tiles & 1) ^ 1)
        alpha_smem.store(inv_l)
        gl.thread_barrier()
        mbarrier.arrive(p_full)

        heads = head0 + gl.arange(0, _BLOCK_H, layout=row_o)
        h_ok = heads < num_heads
        _store_half(o, gl.convert_layout(inv_l, row_o), Out, PartOut, req, heads, h_ok, split, 0, stride_ot,
                    stride_oh, stride_pt, stride_ph, stride_ps, SPLIT_OUT, o_layout)
        if SPLIT_OUT:  # as attention_decode.store_split_lse
            heads_s = head0 + gl.arange(0, _BLOCK_H, layout=row_s)
            lse = gl.where(has_keys, m_i + gl.log2(gl.where(has_keys, l_i, 1.0)), float("-inf"))
            rows = (req * stride_pt + heads_s.to(gl.int64) * stride_ph) // stride_ps + split
            gl.store(PartLse + rows, lse, mask=heads_s < num_heads)

    @gluon.jit
    def _value_wg(k1, p_smem, alpha_smem, ready, empty, p_full, p_empty, Out, PartOut, req, split, head0,
                  num_heads, start, end, n_tiles, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                  SPLIT_OUT: gl.constexpr):
        """Warpgroup 1: O[:, HALF:] += P V[:, HALF:] with warpgroup 0's P, then its normalised half."""
        HALF: gl.constexpr = k1.type.shape[2]
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        o = gl.zeros([_BLOCK_H, HALF], gl.float32, o_layout)
        for t in range(n_tiles):
            st = t % _STAGES
            mbarrier.wait(p_full, t & 1)  # also means tile t landed and warpgroup 0's QK^T read it
            alpha = alpha_smem.load(row_o)
            valid = end - (start + t * _BLOCK_N)
            if valid < _BLOCK_N:
                _zero_tail(k1.index(st), valid, 4)
            o = warpgroup_mma(p_smem, k1.index(st), o * alpha[:, None], is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o,))
            gl.thread_barrier()
            mbarrier.arrive(p_empty)
            mbarrier.arrive(empty.index(st))
        mbarrier.wait(p_full, n_tiles & 1)
        inv_l = alpha_smem.load(row_o)
        heads = head0 + gl.arange(0, _BLOCK_H, layout=row_o)
        _store_half(o, inv_l, Out, PartOut, req, heads, heads < num_heads, split, HALF, stride_ot, stride_oh,
                    stride_pt, stride_ph, stride_ps, SPLIT_OUT, o_layout)

    @gluon.jit
    def _mla_decode_gluon_kernel(q_lat, q_rope, c_lat, c_rope, BlockTables, SeqLens, Out, PartOut, PartLse,
                                 scale_log2, num_heads, stride_bt, stride_ot, stride_oh, stride_pt, stride_ph,
                                 stride_ps, num_splits, PAGE: gl.constexpr, SPLIT_OUT: gl.constexpr):
        # Grid (head blocks, requests, splits), head blocks fastest: the programs of one request run together
        # and the second reads each key tile from L2.
        hb = gl.program_id(0)
        req = gl.program_id(1)
        split = gl.program_id(2)
        seq_len = gl.load(SeqLens + req)
        split_len = gl.cdiv(gl.cdiv(seq_len, num_splits), _BLOCK_N) * _BLOCK_N  # as attention_decode.split_range
        start = split * split_len
        end = gl.minimum(start + split_len, seq_len)
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), _BLOCK_N)
        head0 = hb * _BLOCK_H

        lat_layout: gl.constexpr = q_lat.layout
        rope_layout: gl.constexpr = q_rope.layout
        HALF: gl.constexpr = q_lat.block_type.shape[1]
        dtype: gl.constexpr = q_lat.dtype
        q0 = gl.allocate_shared_memory(dtype, [_BLOCK_H, HALF], lat_layout)
        q1 = gl.allocate_shared_memory(dtype, [_BLOCK_H, HALF], lat_layout)
        qr = gl.allocate_shared_memory(dtype, [_BLOCK_H, _ROPE], rope_layout)
        k0 = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, HALF], lat_layout)
        k1 = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, HALF], lat_layout)
        kr = gl.allocate_shared_memory(dtype, [_STAGES, _BLOCK_N, _ROPE], rope_layout)
        p_smem = gl.allocate_shared_memory(dtype, [_BLOCK_H, _BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([_BLOCK_H, _BLOCK_N], dtype))
        alpha_smem = gl.allocate_shared_memory(gl.float32, [_BLOCK_H],
                                               gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
        p_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        p_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(p_full, count=1)
        mbarrier.init(p_empty, count=1)
        for s in gl.static_range(_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both warpgroups' MMAs on the stage are done

        q_row = req * num_heads + head0
        gl.warp_specialize([
            (_softmax_wg, (q0, q1, qr, k0, k1, kr, p_smem, alpha_smem, q_bar, ready, empty, p_full, p_empty,
                           Out, PartOut, PartLse, req, split, head0, num_heads, start, end, n_tiles, scale_log2,
                           stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, SPLIT_OUT)),
            (_value_wg, (k1, p_smem, alpha_smem, ready, empty, p_full, p_empty, Out, PartOut, req, split, head0,
                         num_heads, start, end, n_tiles, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                         SPLIT_OUT)),
            (_loader, (q_lat, q_rope, c_lat, c_rope, q0, q1, qr, k0, k1, kr, q_bar, ready, empty, BlockTables,
                       stride_bt, req, q_row, start, end, n_tiles, PAGE)),
        ], [4, 1], [192, 40])  # registers per thread asked for warpgroup 1 and the producer; warpgroup 0 gets the rest


def launch_mla_decode_gluon(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, scale_log2: float, out: torch.Tensor, part_out: torch.Tensor,
                            part_lse: torch.Tensor, num_splits: int) -> None:
    """Run the kernel over grid (head blocks, requests, splits); the caller checked `mla_gluon_unsupported`,
    chose num_splits and allocated out (and the fp32 partials when num_splits > 1: `attention_decode`'s).

    The descriptors are built on the host: a launch costs ~105 us of host time against 36 us for the Triton
    kernel (H100), which CUDA graphs, as the engine's decode steps use, replay without; descriptors built in
    the kernel made the kernel ~7% slower (155 against 145 us, B64 context 4096 on an H100)."""
    # The block table's entries become TMA coordinates: int32 with consecutive pages.
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1, "block_tables: int32, contiguous rows"
    num_reqs, num_heads, dk = q.shape
    q2d = q.contiguous().view(num_reqs * num_heads, dk)
    if q2d.data_ptr() % 16:  # TMA needs 16-byte aligned rows (a view may start anywhere)
        q2d = q2d.clone()
    rows = kv_cache.view(kv_cache.shape[0] * kv_cache.shape[1], dk)
    half = LORA // 2
    box = min(kv_cache.shape[1], BLOCK_N)  # a box never crosses a page
    split_out = num_splits > 1
    _mla_decode_gluon_kernel[(triton.cdiv(num_heads, BLOCK_H), num_reqs, num_splits)](
        host_descriptor(q2d, [BLOCK_H, half]), host_descriptor(q2d, [BLOCK_H, ROPE]),
        host_descriptor(rows, [box, half]), host_descriptor(rows, [box, ROPE]), block_tables, seq_lens, out, part_out,
        part_lse, scale_log2, num_heads, block_tables.stride(0), out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if split_out else 1, num_splits,
        PAGE=kv_cache.shape[1], SPLIT_OUT=split_out, num_warps=4,
    )
