"""The aligned fused-MoE GEMMs at large M as persistent, warp-specialised Gluon kernels (Hopper).

gate/up has `fused_moe_tma.gate_up_tma`'s contract, with the token rows already in slot order. down writes its
rows by slot rather than by pair, with the slot of each pair beside them, for `fused_moe.topk_sum`. 16-bit
weights only. Why they exist: at M = 8192 the Triton kernels run one (128-row block, N tile) per program, and
a program's pipeline fill and epilogue leave the tensor cores idle. Down's k loop is only 12 steps at Qwen3's
K = 768, so it ran at 422 TFLOP/s against cuBLAS's 582-606 on the same shape as one dense GEMM
(benchmarks/RESULTS.md, session 22). Here one program per multiprocessor walks the tiles, so

- a producer warp loads each k step's activation rows and weight rows by TMA into a ring of shared-memory
  stages, running up to STAGES steps ahead, across tile boundaries: the next tile's first stages load while
  this tile's last MMAs and its epilogue run;
- two consumer warpgroups each own 64 rows of the tile's 128 (a [64, BLOCK_N] fp32 accumulator per GEMM
  operand, 128 registers a thread) and issue wgmma on the shared stages, keeping one in flight; a stage is
  released once both have finished reading it. A block that holds at most 64 valid rows leaves the second
  warpgroup's MMAs out (it still takes part in the stage handshakes);
- each warpgroup's epilogue goes through its own shared-memory tile to a TMA store that runs on during the
  next tile's MMAs (`_store_tile`); for that down's rows go out by slot, contiguous, not scattered by pair.

Measured (H100, benchmarks/RESULTS.md, session 23): at Qwen3 M = 8192 down takes 394 us against the Triton
kernel's 500 (523 against 412 TFLOP/s), a whole call 5% less; at DeepSeek's shape it is no faster. gate/up,
whose token rows must first be copied into slot order (TMA cannot gather rows on Hopper), loses that copy's
time at the Qwen3 and DeepSeek shapes and gains at Mixtral's (M >= 4096, a whole call 9-12% less). At M <= 2048
both lose to the Triton kernels. The tables pick it where it gained. What bounds it: every k step a 128 x 256
tile reads 48 KB from L2 for 4.2 MFLOP, about 8 TB/s at the tensor rate, and Triton 3.6's Gluon has no TMA
multicast to share a tile between the multiprocessors of a cluster.

The tile order is the Triton kernels' (`moe_tiles.block_of`): GROUP_M consecutive blocks, mostly of one expert,
take each weight tile in turn while it is in L2. Unused blocks (expert -1) are skipped by all three partitions
alike. Requirements (`gluon_gemm_unsupported`): Triton 3.6 (Gluon's API changes between releases), a Hopper
GPU, 16-bit operands, N a multiple of BLOCK_N and K of BLOCK_K (the weights' row blocks must not cross experts).
"""

from __future__ import annotations

import torch

from . import gluon_support
from .device import num_sms
from .gluon_support import fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

BLOCK_M = 128  # two consumer warpgroups of 64 rows
HALF_M = 64
SHARED_LIMIT = 227 * 1024  # an H100 block's shared memory


def shared_bytes(block_n: int, block_k: int, stages: int, weight_tiles: int, elem_bytes: int = 2) -> int:
    """Shared memory of one program: `stages` ring stages (128 activation rows and weight_tiles weight tiles of
    block_n rows, block_k deep), the two warpgroups' epilogue tiles, and 1 KB for barriers and Triton's own."""
    ring = stages * (BLOCK_M + weight_tiles * block_n) * block_k
    return (ring + 2 * HALF_M * block_n) * elem_bytes + 1024


def gluon_gemm_unsupported(w: torch.Tensor, n: int, k: int, block_m: int, block_n: int, block_k: int,
                           stages: int = 3, weight_tiles: int = 1) -> str | None:
    """Why the Gluon grouped GEMM cannot run over weights w with output width n and depth k in these tiles
    (weight_tiles: 2 for gate/up, which loads a gate and an up tile a stage), or None when it can."""
    if (problem := gluon_support.gluon_platform_problem(w.device, "the Gluon grouped GEMM")) is not None:
        return problem
    if w.dtype not in gluon_support.GL_DTYPES:
        return f"the Gluon grouped GEMM takes bf16/fp16 weights, got {w.dtype}"
    if block_m != BLOCK_M or n % block_n or k % block_k or block_n > 256 or block_k > 128:
        return f"tiles {block_m}x{block_n}x{block_k} do not fit n={n}, k={k} (block_m {BLOCK_M}, n % block_n = 0)"
    if (need := shared_bytes(block_n, block_k, stages, weight_tiles)) > SHARED_LIMIT:
        return (f"{stages} stages of {block_n}x{block_k} tiles take {need} bytes of shared memory, over the "
                f"{SHARED_LIMIT} a block may have")
    return None


if gluon is not None:
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.jit
    def _tile(t, num_n, max_blocks, GROUP_M: gl.constexpr):
        """(block, N tile) of tile t in grouped order (as `moe_tiles.block_of` orders programs)."""
        width = GROUP_M * num_n
        first_m = (t // width) * GROUP_M
        size_m = gl.minimum(max_blocks - first_m, GROUP_M)
        return first_m + (t % width) % size_m, (t % width) // size_m

    @gluon.jit
    def _loader(a_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, BlockExpert, max_blocks, num_n, k_steps,
                w_rows, up_off, GATE_UP: gl.constexpr, GROUP_M: gl.constexpr):
        """Producer warp: each used tile's k steps into the ring, STAGES ahead of the consumers at most."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        BLOCK_K: gl.constexpr = a_smem.type.shape[2]
        if GATE_UP:
            nbytes: gl.constexpr = a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
        else:
            nbytes: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
        c = 0
        for t in range(gl.program_id(0), max_blocks * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile(t, num_n, max_blocks, GROUP_M)
            expert = gl.load(BlockExpert + pid_m)
            if expert >= 0:
                row = pid_m * _BLOCK_M
                w_row = expert * w_rows + pid_n * BLOCK_N
                for kk in range(k_steps):
                    s = c % STAGES
                    # A fresh barrier counts as having completed the phase before phase 0: round 0 passes at once.
                    mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
                    bar = ready.index(s)
                    mbarrier.expect(bar, nbytes)
                    tma.async_copy_global_to_shared(a_desc, [row, kk * BLOCK_K], bar, a_smem.index(s))
                    tma.async_copy_global_to_shared(w_desc, [w_row, kk * BLOCK_K], bar, g_smem.index(s))
                    if GATE_UP:
                        tma.async_copy_global_to_shared(w_desc, [w_row + up_off, kk * BLOCK_K], bar, u_smem.index(s))
                    c += 1

    @gluon.jit
    def _skip_steps(ready, empty, c, k_steps, STAGES: gl.constexpr):
        """A warpgroup with no valid rows in the tile: take part in its stage handshakes only."""
        for _ in range(k_steps):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            mbarrier.arrive(empty.index(s))
            c += 1
        return c

    @gluon.jit
    def _mma_steps(a_smem, g_smem, u_smem, ready, empty, c, k_steps, r0: gl.constexpr, GATE_UP: gl.constexpr,
                   layout: gl.constexpr):
        """This warpgroup's 64 rows (from r0 of the stage) times the tile's weight rows over k_steps stages,
        one wgmma group left in flight; each stage is released once its MMAs are done. Returns the counter
        and the accumulators (gate, up; down: its accumulator, then an unused zero tile)."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        acc_g = gl.zeros([_HALF_M, BLOCK_N], gl.float32, layout)
        acc_u = gl.zeros([_HALF_M, BLOCK_N], gl.float32, layout)
        for kk in range(k_steps):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            a = a_smem.index(s).slice(r0, _HALF_M)
            acc_g = warpgroup_mma(a, g_smem.index(s).permute((1, 0)), acc_g, is_async=True)
            if GATE_UP:
                acc_u = warpgroup_mma(a, u_smem.index(s).permute((1, 0)), acc_u, is_async=True)
                acc_g, acc_u = warpgroup_mma_wait(num_outstanding=2, deps=(acc_g, acc_u))
            else:
                acc_g = warpgroup_mma_wait(num_outstanding=1, deps=(acc_g,))
            if kk > 0:  # the previous stage's MMAs are done in every warp of the group
                gl.thread_barrier()
                mbarrier.arrive(empty.index((c - 1) % STAGES))
            c += 1
        if GATE_UP:
            acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
        else:
            acc_g = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g,))
        gl.thread_barrier()
        mbarrier.arrive(empty.index((c - 1) % STAGES))
        return c, acc_g, acc_u

    @gluon.jit
    def _store_tile(out, buf, out_desc, row, col):
        """out ([64, BLOCK_N], the accumulator's layout) to rows row... of the output by TMA, through this
        warpgroup's buffer in shared memory. The copy runs on while the warpgroup goes on to its next tile's
        MMAs; only the next tile's store waits for it to have read the buffer. Qwen3's down at M = 8192 took
        590 us with stores from the accumulator's layout (4 bytes a thread in 8 rows a warp), 426 us through
        shared memory with 16-byte stores along rows, 394 us by TMA (benchmarks/RESULTS.md, session 23)."""
        tma.store_wait(0)
        gl.thread_barrier()  # the last copy out of buf is done (only the issuing thread waited)
        buf.store(out)
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(out_desc, [row, col], buf)

    @gluon.jit
    def _consumer(a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                  BlockRows, max_blocks, num_n, k_steps, WG: gl.constexpr, GATE_UP: gl.constexpr,
                  GROUP_M: gl.constexpr):
        """Consumer warpgroup WG: rows WG * 64 ... of every used tile, then its epilogue into the output rows of
        the same slots: gate/up's silu(gate) * up; down's routed weight times its rows, and (first N tile) each
        valid pair's slot. The next tile's block tables (and down's pair indices) are read while this tile
        runs, so their latency does not stall the tensor cores."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
        rows_l: gl.constexpr = gl.SliceLayout(1, layout)
        r0: gl.constexpr = WG * _HALF_M
        lanes = gl.arange(0, _HALF_M, layout=rows_l)
        total = max_blocks * num_n
        step = gl.num_programs(0)
        # The first tile's tables (the grid is never larger than the tile count).
        m_next, n_next = _tile(gl.program_id(0), num_n, max_blocks, GROUP_M)
        e_next = gl.load(BlockExpert + m_next)
        v_next = gl.load(BlockRows + m_next) - r0
        p_next = gl.load(Sorted + m_next * _BLOCK_M + r0 + lanes)  # padding slots: junk, never used unmasked
        c = 0
        for t in range(gl.program_id(0), total, step):
            pid_m, pid_n, expert, valid, pair = m_next, n_next, e_next, v_next, p_next
            has_next = t + step < total
            m_next, n_next = _tile(t + step, num_n, max_blocks, GROUP_M)
            e_next = gl.load(BlockExpert + m_next, mask=has_next, other=-1)
            v_next = gl.load(BlockRows + m_next, mask=has_next, other=0) - r0
            if not GATE_UP:
                p_next = gl.load(Sorted + m_next * _BLOCK_M + r0 + lanes, mask=(lanes >= 0) & has_next, other=0)
            if expert >= 0:
                if valid > 0:
                    row_ok = lanes < valid
                    if not GATE_UP:  # pair came in during the last tile; the weights come in during this one
                        weight = gl.load(TopkW + pair, mask=row_ok, other=0.0)
                    c, acc_g, acc_u = _mma_steps(a_smem, g_smem, u_smem, ready, empty, c, k_steps, r0, GATE_UP,
                                                 layout)
                    if GATE_UP:
                        out = acc_g / (1.0 + gl.exp(-acc_g)) * acc_u
                    else:
                        out = acc_g * weight[:, None]
                        if pid_n == 0:  # where the top-k sum finds each pair's row
                            gl.store(SlotOfPair + pair, pid_m * _BLOCK_M + r0 + lanes, mask=row_ok)
                    # Every row of the tile, padding too: nothing reads the padding rows' results.
                    _store_tile(out.to(out_desc.dtype), epi.index(WG), out_desc, pid_m * _BLOCK_M + r0,
                                pid_n * BLOCK_N)
                else:
                    c = _skip_steps(ready, empty, c, k_steps, STAGES)
        tma.store_wait(0)  # the last copy has read its buffer before the program ends

    @gluon.jit
    def _consumer0(a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                   BlockRows, max_blocks, num_n, k_steps, GATE_UP: gl.constexpr, GROUP_M: gl.constexpr):
        _consumer(a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                  BlockRows, max_blocks, num_n, k_steps, gl.constexpr(0), GATE_UP, GROUP_M)

    @gluon.jit
    def _consumer1(a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                   BlockRows, max_blocks, num_n, k_steps, GATE_UP: gl.constexpr, GROUP_M: gl.constexpr):
        _consumer(a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                  BlockRows, max_blocks, num_n, k_steps, gl.constexpr(1), GATE_UP, GROUP_M)

    # max_blocks follows the call's size: not specialised (as in the Triton kernels), so that no call size
    # compiles anything after start-up's warm-up (`fused_moe.warmup_token_counts`).
    @gluon.jit(do_not_specialize=["max_blocks"])
    def _grouped_gemm_kernel(a_desc, w_desc, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert, BlockRows,
                             max_blocks, num_n, k_steps, w_rows, up_off, GATE_UP: gl.constexpr, STAGES: gl.constexpr,
                             GROUP_M: gl.constexpr):
        dtype: gl.constexpr = a_desc.dtype
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK_M, BLOCK_K], a_desc.layout)
        g_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        if GATE_UP:
            u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        else:
            u_smem = g_smem
        epi = gl.allocate_shared_memory(dtype, [2, _HALF_M, BLOCK_N], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups are done with the stage
        gl.warp_specialize([
            (_consumer0, (a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted,
                          BlockExpert, BlockRows, max_blocks, num_n, k_steps, GATE_UP, GROUP_M)),
            (_consumer1, (a_smem, g_smem, u_smem, epi, ready, empty, out_desc, SlotOfPair, TopkW, Sorted,
                          BlockExpert, BlockRows, max_blocks, num_n, k_steps, GATE_UP, GROUP_M)),
            (_loader, (a_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, BlockExpert, max_blocks, num_n,
                       k_steps, w_rows, up_off, GATE_UP, GROUP_M)),
        ], [4, 1], [232, 40])



def _launch(a: torch.Tensor, w2d: torch.Tensor, out: torch.Tensor, slot_of_pair: torch.Tensor,
            topk_weights: torch.Tensor, routing, w_rows: int, up_off: int, n: int, k: int, block_n: int,
            block_k: int, stages: int, group_m: int, gate_up: bool) -> None:
    num_n = n // block_n
    tiles = routing.max_blocks * num_n
    grid = (min(tiles, num_sms(a.device)),)
    _grouped_gemm_kernel[grid](
        gluon_support.host_descriptor(a, [BLOCK_M, block_k]), gluon_support.host_descriptor(w2d, [block_n, block_k]),
        gluon_support.host_descriptor(out, [HALF_M, block_n]),
        slot_of_pair, topk_weights, routing.sorted_ids, routing.block_expert, routing.block_rows,
        routing.max_blocks, num_n, k // block_k, w_rows, up_off, GATE_UP=gate_up, STAGES=stages, GROUP_M=group_m,
        num_warps=4)


def gate_up_gluon(x_slots: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, routing, block_n: int,
                  block_k: int, stages: int, group_m: int) -> None:
    """act[slot] = silu(x_slots[slot] . w13[e, :I]) * (x_slots[slot] . w13[e, I:]) for the slots of every used
    block (x_slots: the token rows in slot order, `fused_moe_tma.gather_slots`)."""
    num_experts, two_i, hidden = w13.shape
    _launch(x_slots, w13.view(num_experts * two_i, hidden), act, act, act, routing, two_i, two_i // 2, two_i // 2,
            hidden, block_n, block_k, stages, group_m, True)


def down_gluon(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, routing, block_n: int,
               block_k: int, stages: int, group_m: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_slots, slot_of_pair): y_slots [slots, H] holds topk_weight[pair] * (act[slot] . w2[e]) in slot order
    (rows of padding slots hold junk), slot_of_pair [M*k] int32 the slot of each valid pair (others unset),
    for `fused_moe.topk_sum`. Rows by slot let the epilogue store whole tiles by TMA."""
    num_experts, hidden, inter = w2.shape
    y_slots = torch.empty(act.shape[0], hidden, dtype=out_dtype, device=act.device)
    slot_of_pair = torch.empty(topk_weights.numel(), dtype=torch.int32, device=act.device)
    _launch(act, w2.view(num_experts * hidden, inter), y_slots, slot_of_pair, topk_weights, routing, hidden, 0,
            hidden, inter, block_n, block_k, stages, group_m, False)
    return y_slots, slot_of_pair
