"""The aligned fused-MoE GEMMs at large M as persistent, warp-specialised Gluon kernels (Hopper).

gate/up has `fused_moe_tma.gate_up_tma`'s contract, with the token rows already in slot order. down writes its rows
by slot rather than by pair, with the slot of each pair beside them, for `fused_moe.topk_sum`. 16-bit weights, or
e4m3 weights with 128 x 128 block scales (below). Why they exist: at M = 8192 the Triton kernels run one (128-row
block, N tile) per program, and a program's pipeline fill and epilogue leave the tensor cores idle. Down's k loop is
only 12 steps at Qwen3's K = 768, so it ran at 422 TFLOP/s against cuBLAS's 582-606 on the same shape as one dense
GEMM (benchmarks/RESULTS.md, session 22). Here one program per multiprocessor walks the tiles, so

- a producer warp loads each k step's activation rows and weight rows by TMA into a ring of shared-memory
  stages, running up to STAGES steps ahead, across tile boundaries: the next tile's first stages load while
  this tile's last MMAs and its epilogue run. A block of at most 64 rows loads only those 64 activation rows
  (`HALF_A`: whole calls made mostly of such blocks, Qwen3 and DeepSeek fp8 at M = 512 in these tiles, took 4%
  less; the tables' Gluon entries 0-2% less);
- two consumer warpgroups each own 64 rows of the tile's 128 (a [64, BLOCK_N] fp32 accumulator per GEMM
  operand, 128 registers a thread) and issue wgmma on the shared stages, keeping one in flight; a stage is
  released once both have finished reading it. A block that holds at most 64 valid rows leaves the second
  warpgroup's MMAs out (it still takes part in the stage handshakes). Handing such a block's up half to the
  second warpgroup (fp8, sums exchanged through shared memory) was measured slower, 11% at Mixtral M = 512
  (benchmarks/RESULTS.md, session 25);
- each warpgroup's epilogue goes through its own shared-memory tile to a TMA store that runs on during the
  next tile's MMAs (`_store_tile`); for that down's rows go out by slot, contiguous, not scattered by pair.

fp8 (`_mma_steps_fp8`): tiles of one 128 x 128 scale block. Each k step's MMA writes a fresh partial, which the
warpgroup scales by its rows' activation scales and the weight block's scale and adds to its sum, with the next
step's scales already loading; while one warpgroup scales, the other's MMAs keep the tensor cores busy. gate/up
quantises act in its epilogue (each 128-wide tile is one group: per-row scale, e4m3 by TMA store), as the
Triton kernels' fused epilogue does. At Mixtral's 96-128 pairs per expert the Triton kernels' fp8 k loop ran
MMA-bound at a third of the fp8 rate (session 5); here a whole call at M = 384 takes 581 us against 667
(0.812 of the roofline, was 0.707), at M = 2048 1717 against 2530 (benchmarks/RESULTS.md, session 24).

Measured (H100, benchmarks/RESULTS.md, session 23): at Qwen3 M = 8192 down takes 394 us against the Triton
kernel's 500 (523 against 412 TFLOP/s), a whole call 5% less; at DeepSeek's shape it is no faster. gate/up,
whose token rows must first be copied into slot order (TMA cannot gather rows on Hopper), loses that copy's
time at the Qwen3 and DeepSeek shapes and gains at Mixtral's (M >= 4096, a whole call 9-12% less). At M <= 2048
both lose to the Triton kernels. The tables pick it where it gained. What bounds it: every k step a 128 x 256
tile reads 48 KB from L2 for 4.2 MFLOP, about 8 TB/s at the tensor rate, and Triton 3.6's Gluon has no TMA
multicast to share a tile between the multiprocessors of a cluster.

The tile order is the Triton kernels' (`moe_tiles.block_of`): GROUP_M consecutive blocks, mostly of one expert,
take each weight tile in turn while it is in L2. Unused blocks (expert -1) are skipped by all three partitions
alike. Program p takes tiles p, p + programs, ... (static), or, with `GemmConfig.dynamic_tiles`, draws each next
tile from a counter in the same order: its producer draws one tile ahead and passes it to the consumers through
a two-slot queue in shared memory. Striding suits blocks of one cost. Where experts get a full block and a short
one, the grid and GROUP_M can line up so that some programs get only full tiles: at Mixtral fp8 M = 640 drawn
tiles took 845 us against 1085 strided (and 952 in the Triton tiles the table had), at M = 800 835 against 859.
At M = 384-512 and 2048 drawing was 2-5% slower, and there gate/up's GROUP_M 7 rather than 8-16 gained up to 5%
(benchmarks/RESULTS.md, session 26).

Requirements (`gluon_gemm_unsupported`): Triton 3.6 (Gluon's API changes between releases), a Hopper
GPU, 16-bit or e4m3 operands (e4m3: 128 x 128 tiles), N a multiple of BLOCK_N and K of BLOCK_K (the weights' row
blocks must not cross experts).
"""

from __future__ import annotations

import torch

from . import gluon_support
from .counters import completion_counters
from .device import num_sms
from .fp8 import FP8_DTYPE, FP8_MAX, GROUP, MIN_AMAX
from .gluon_support import fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

BLOCK_M = 128  # two consumer warpgroups of 64 rows
HALF_M = 64
SHARED_LIMIT = 227 * 1024  # an H100 block's shared memory
HALF_A = True  # a block of at most 64 rows loads 64 activation rows a k step, not 128 (`_loader`)


def shared_bytes(block_n: int, block_k: int, stages: int, weight_tiles: int, elem_bytes: int = 2,
                 out_bytes: int = 2) -> int:
    """Shared memory of one program: `stages` ring stages (128 activation rows and weight_tiles weight tiles of
    block_n rows, block_k deep, elem_bytes a value), the two warpgroups' epilogue tiles (out_bytes a value), and
    1 KB for barriers and Triton's own."""
    ring = stages * (BLOCK_M + weight_tiles * block_n) * block_k
    return ring * elem_bytes + 2 * HALF_M * block_n * out_bytes + 1024


def gluon_gemm_unsupported(w: torch.Tensor, n: int, k: int, block_m: int, block_n: int, block_k: int,
                           stages: int = 3, weight_tiles: int = 1,
                           out_dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the Gluon grouped GEMM cannot run over weights w with output width n and depth k in these tiles
    (weight_tiles: 2 for gate/up, which loads a gate and an up tile a stage) into an out_dtype output, or None
    when it can."""
    if (problem := gluon_support.gluon_platform_problem(w.device, "the Gluon grouped GEMM")) is not None:
        return problem
    fp8 = w.dtype == FP8_DTYPE
    if w.dtype not in gluon_support.GL_DTYPES and not fp8:
        return f"the Gluon grouped GEMM takes bf16/fp16 or float8_e4m3fn weights, got {w.dtype}"
    if block_m != BLOCK_M or n % block_n or k % block_k or block_n > 256 or block_k > 128:
        return f"tiles {block_m}x{block_n}x{block_k} do not fit n={n}, k={k} (block_m {BLOCK_M}, n % block_n = 0)"
    if fp8 and (block_n != GROUP or block_k != GROUP):
        return f"fp8 tiles must be {GROUP} wide and deep (one scale block each), got {block_n}x{block_k}"
    if fp8 and weight_tiles == 2 and out_dtype != FP8_DTYPE:
        return f"fp8 gate/up quantises act in its epilogue: its output must be float8_e4m3fn, got {out_dtype}"
    if out_dtype not in gluon_support.DESCRIPTOR_DTYPES:
        return f"the Gluon grouped GEMM writes bf16/fp16 or float8_e4m3fn outputs, got {out_dtype}"
    need = shared_bytes(block_n, block_k, stages, weight_tiles, w.element_size(), out_dtype.itemsize)
    if need > SHARED_LIMIT:
        return (f"{stages} stages of {block_n}x{block_k} tiles take {need} bytes of shared memory, over the "
                f"{SHARED_LIMIT} a block may have")
    return None


if gluon is not None:
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _HALF_M = gl.constexpr(HALF_M)
    _GROUP = gl.constexpr(GROUP)
    _FP8_MAX = gl.constexpr(FP8_MAX)
    _MIN_AMAX = gl.constexpr(MIN_AMAX)

    @gluon.jit
    def _tile(t, num_n, max_blocks, GROUP_M: gl.constexpr):
        """(block, N tile) of tile t in grouped order (as `moe_tiles.block_of` orders programs)."""
        width = GROUP_M * num_n
        first_m = (t // width) * GROUP_M
        size_m = gl.minimum(max_blocks - first_m, GROUP_M)
        return first_m + (t % width) % size_m, (t % width) // size_m

    @gluon.jit
    def _load_step(a_desc, a_half_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, c, kk, row, w_row, rows,
                   up_off, GATE_UP: gl.constexpr):
        """k step kk of a tile (activation rows from row, weight rows from w_row) into ring stage c % STAGES once
        the consumers have released it; returns c + 1. A block of at most 64 rows (rows; only the first
        warpgroup reads it) takes 64 activation rows (a_half_desc) into the top of the stage."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_K: gl.constexpr = a_smem.type.shape[2]
        if GATE_UP:
            w_bytes: gl.constexpr = 2 * w_desc.block_type.nbytes
        else:
            w_bytes: gl.constexpr = w_desc.block_type.nbytes
        s = c % STAGES
        # A fresh barrier counts as having completed the phase before phase 0: round 0 passes at once.
        mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        if rows <= _HALF_M:
            mbarrier.expect(bar, a_half_desc.block_type.nbytes + w_bytes)
            tma.async_copy_global_to_shared(a_half_desc, [row, kk * BLOCK_K], bar, a_smem.index(s).slice(0, _HALF_M))
        else:
            mbarrier.expect(bar, a_desc.block_type.nbytes + w_bytes)
            tma.async_copy_global_to_shared(a_desc, [row, kk * BLOCK_K], bar, a_smem.index(s))
        tma.async_copy_global_to_shared(w_desc, [w_row, kk * BLOCK_K], bar, g_smem.index(s))
        if GATE_UP:
            tma.async_copy_global_to_shared(w_desc, [w_row + up_off, kk * BLOCK_K], bar, u_smem.index(s))
        return c + 1

    @gluon.jit
    def _block_tables(t, total, num_n, max_blocks, BlockExpert, BlockRows, GROUP_M: gl.constexpr,
                      HALF: gl.constexpr):
        """(block, N tile, expert, valid rows) of tile t; expert -1 past the last tile. Without HALF the rows
        are a constant, so the producer never builds `_load_step`'s 64-row branch."""
        has = t < total
        pid_m, pid_n = _tile(t, num_n, max_blocks, GROUP_M)
        expert = gl.load(BlockExpert + pid_m, mask=has, other=-1)
        rows = _BLOCK_M
        if HALF:
            rows = gl.load(BlockRows + pid_m, mask=has, other=0)
        return pid_m, pid_n, expert, rows

    @gluon.jit
    def _draw(Ticket, last):
        """The next tile from the launch's ticket counter. The program that draws the last ticket of the launch
        (every program draws until it gets one past the tiles: total + programs tickets in all) sets the counter
        back to 0, as `counters.completion_counters` promise between launches."""
        t = gl.atomic_add(Ticket, 1, sem="relaxed")
        gl.store(Ticket, 0, mask=t == last)
        return t

    @gluon.jit
    def _publish(tiles, tile_ready, tile_empty, i, t):
        """Producer: the program's i-th tile t into slot i % 2 of the tile queue, once both consumers have
        taken the tile that slot held before."""
        slot = i % 2
        mbarrier.wait(tile_empty.index(slot), ((i // 2) & 1) ^ 1)
        one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        tiles.index(slot).store(gl.full([1], 0, gl.int32, one) + t)
        gl.thread_barrier()  # the warp's stores before the (single-thread) arrive
        mbarrier.arrive(tile_ready.index(slot))

    @gluon.jit
    def _take(tiles, tile_ready, tile_empty, i):
        """Consumer: the program's i-th tile from the queue (`_publish`)."""
        slot = i % 2
        mbarrier.wait(tile_ready.index(slot), (i // 2) & 1)
        four: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        t = gl.max(tiles.index(slot).load(four), axis=0)
        gl.thread_barrier()  # every warp has read the slot
        mbarrier.arrive(tile_empty.index(slot))
        return t

    @gluon.jit
    def _next_tile(Ticket, last, tiles, tile_ready, tile_empty, i, t, step, DYNAMIC: gl.constexpr):
        """The producer's next tile after t, its i-th: DYNAMIC, drawn from the ticket counter and published to the
        consumers; otherwise t + step."""
        if DYNAMIC:
            t_next = _draw(Ticket, last)
            _publish(tiles, tile_ready, tile_empty, i, t_next)
        else:
            t_next = t + step
        return t_next

    @gluon.jit
    def _loader(a_desc, a_half_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, tiles, tile_ready, tile_empty,
                Ticket, BlockExpert, BlockRows, max_blocks, num_n, k_steps, w_rows, up_off, GATE_UP: gl.constexpr,
                GROUP_M: gl.constexpr, HALF: gl.constexpr, DYNAMIC: gl.constexpr):
        """Producer warp: each used tile's k steps into the ring, STAGES ahead of the consumers at most. Its
        tiles: DYNAMIC, drawn from the ticket counter and passed to the consumers through the tile queue;
        otherwise every num_programs-th tile from its own. The next tile is drawn and its block tables read
        right after this tile's first k step is issued, while the producer waits for a free stage anyway, not
        at the tile boundary (drawing there was 4% slower at Mixtral fp8 M = 640)."""
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        total = max_blocks * num_n
        step = gl.num_programs(0)
        last = total + step - 1
        if DYNAMIC:
            t = _draw(Ticket, last)
            _publish(tiles, tile_ready, tile_empty, 0, t)
        else:
            t = gl.program_id(0)
        pid_m, pid_n, expert, rows = _block_tables(t, total, num_n, max_blocks, BlockExpert, BlockRows, GROUP_M,
                                                   HALF)
        c = 0
        i = 1
        while t < total:
            row = pid_m * _BLOCK_M
            w_row = expert * w_rows + pid_n * BLOCK_N
            cur_expert, cur_rows = expert, rows
            if cur_expert >= 0:
                c = _load_step(a_desc, a_half_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, c, 0, row, w_row,
                               cur_rows, up_off, GATE_UP)
            t = _next_tile(Ticket, last, tiles, tile_ready, tile_empty, i, t, step, DYNAMIC)
            pid_m, pid_n, expert, rows = _block_tables(t, total, num_n, max_blocks, BlockExpert, BlockRows, GROUP_M,
                                                       HALF)
            if cur_expert >= 0:
                for kk in range(1, k_steps):
                    c = _load_step(a_desc, a_half_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, c, kk, row,
                                   w_row, cur_rows, up_off, GATE_UP)
            i += 1

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
    def _scaled_mma(a, w, acc, part, scale):
        """acc + (a . w) * scale: one k step's MMA into a fresh fp32 partial, folded into acc with its scale
        ([64] rows: the activation row scales times the weight block's)."""
        part = warpgroup_mma(a, w.permute((1, 0)), part, use_acc=False, is_async=True)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
        return acc + part * scale[:, None]

    @gluon.jit
    def _mma_steps_fp8(a_smem, g_smem, u_smem, ready, empty, c, k_steps, r0: gl.constexpr, GATE_UP: gl.constexpr,
                       layout: gl.constexpr, a_scales, w_scales, g_block, u_block):
        """`_mma_steps` for e4m3 operands with 128-deep k steps, each one scale group: a step's MMA result is
        scaled by its rows' activation scales (a_scales: pointers to this warpgroup's 64 rows of a [*, k_steps]
        row-major table; the caller points padding rows at a valid row) times the weight block's scale
        (w_scales + g_block / u_block + step), then added. The next step's scales are loaded while this step's
        MMAs run. One partial tile is live at a time (gate, then up): the accumulators and partial take 192
        registers a thread at 128-wide tiles; the other warpgroup's MMAs fill the tensor cores while this one
        scales."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        acc_g = gl.zeros([_HALF_M, BLOCK_N], gl.float32, layout)
        acc_u = gl.zeros([_HALF_M, BLOCK_N], gl.float32, layout)
        part = gl.zeros([_HALF_M, BLOCK_N], gl.float32, layout)
        a_s = gl.load(a_scales)
        g_s = gl.load(w_scales + g_block)
        u_s = g_s
        if GATE_UP:
            u_s = gl.load(w_scales + u_block)
        for kk in range(k_steps):
            nk = gl.minimum(kk + 1, k_steps - 1)  # the last step reloads its own scales
            a_next = gl.load(a_scales + nk)
            g_next = gl.load(w_scales + g_block + nk)
            u_next = g_next
            if GATE_UP:
                u_next = gl.load(w_scales + u_block + nk)
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            a = a_smem.index(s).slice(r0, _HALF_M)
            acc_g = _scaled_mma(a, g_smem.index(s), acc_g, part, a_s * g_s)
            if GATE_UP:
                acc_u = _scaled_mma(a, u_smem.index(s), acc_u, part, a_s * u_s)
            gl.thread_barrier()  # every warp of the group is done with the stage
            mbarrier.arrive(empty.index(s))
            a_s, g_s, u_s = a_next, g_next, u_next
            c += 1
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
    def _quant_e4m3(out, ROUND: gl.constexpr):
        """out ([64, 128] fp32, one 128-channel group a row) -> (q e4m3, scale [64]) as `fp8.quant_groups_e4m3`
        gives for out stored in ROUND first: scale = max(amax, MIN_AMAX) / FP8_MAX, q = out / scale rounded to nearest
        even (the hardware conversion, as the Triton kernels' rounding)."""
        x = out.to(ROUND).to(gl.float32)
        scale = gl.maximum(gl.max(gl.abs(x), axis=1), _MIN_AMAX) / _FP8_MAX
        q = gl.minimum(gl.maximum(x / scale[:, None], -_FP8_MAX), _FP8_MAX)
        return q.to(gl.float8e4nv), scale

    @gluon.jit
    def _warpgroup_tables(t, total, num_n, max_blocks, BlockExpert, BlockRows, Sorted, pair, r0, lanes,
                          GROUP_M: gl.constexpr, READ_PAIRS: gl.constexpr):
        """`_block_tables` of tile t as a consumer warpgroup (rows r0 ...) reads them: (block, N tile, expert,
        valid rows from r0, the flat pair index of each of its 64 slots). Without READ_PAIRS the pair indices
        are never used and pair comes back as given."""
        pid_m, pid_n, expert, rows = _block_tables(t, total, num_n, max_blocks, BlockExpert, BlockRows, GROUP_M,
                                                   True)
        if READ_PAIRS:  # padding slots: junk, never used unmasked
            pair = gl.load(Sorted + pid_m * _BLOCK_M + r0 + lanes, mask=(lanes >= 0) & (t < total), other=0)
        return pid_m, pid_n, expert, rows - r0, pair

    @gluon.jit
    def _consumer(a_smem, g_smem, u_smem, epi, ready, empty, tiles, tile_ready, tile_empty, out_desc, SlotOfPair,
                  TopkW, Sorted, BlockExpert, BlockRows, AScale, WScale, OutScale, max_blocks, num_n, k_steps, top_k,
                  up_off, a_scale_stride, ws_e, ws_n, out_scale_stride, WG: gl.constexpr, GATE_UP: gl.constexpr,
                  GROUP_M: gl.constexpr, FP8: gl.constexpr, ROUND: gl.constexpr, DYNAMIC: gl.constexpr):
        """Consumer warpgroup WG: rows WG * 64 ... of every used tile, then its epilogue into the output rows of
        the same slots: gate/up's silu(gate) * up (FP8: quantised to e4m3 per row, its scales to OutScale);
        down's routed weight times its rows, and (first N tile) each valid pair's slot. The next tile's block
        tables (and the pair indices, where read) are read while this tile runs, so their latency does not
        stall the tensor cores. FP8: the rows' activation scales come from AScale by token (gate/up) or by slot
        (down), the weight blocks' from WScale ([E, N / 128, K / 128], strides ws_e, ws_n). The tiles come as the
        producer's do (`_loader`): DYNAMIC, from the tile queue."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        BLOCK_N: gl.constexpr = g_smem.type.shape[1]
        INSTR_K: gl.constexpr = 32 if FP8 else 16
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, INSTR_K])
        rows_l: gl.constexpr = gl.SliceLayout(1, layout)
        r0: gl.constexpr = WG * _HALF_M
        READ_PAIRS: gl.constexpr = FP8 or not GATE_UP
        lanes = gl.arange(0, _HALF_M, layout=rows_l)
        total = max_blocks * num_n
        step = gl.num_programs(0)
        # The first tile's tables (a dynamic program may get none).
        if DYNAMIC:
            t = _take(tiles, tile_ready, tile_empty, 0)
        else:
            t = gl.program_id(0)
        m_next, n_next, e_next, v_next, p_next = _warpgroup_tables(t, total, num_n, max_blocks, BlockExpert,
                                                                   BlockRows, Sorted, lanes * 0, r0, lanes, GROUP_M,
                                                                   READ_PAIRS)
        c = 0
        i = 0
        while t < total:
            pid_m, pid_n, expert, valid, pair = m_next, n_next, e_next, v_next, p_next
            if DYNAMIC:
                t = _take(tiles, tile_ready, tile_empty, i + 1)
            else:
                t = t + step
            i += 1
            m_next, n_next, e_next, v_next, p_next = _warpgroup_tables(t, total, num_n, max_blocks, BlockExpert,
                                                                       BlockRows, Sorted, pair, r0, lanes, GROUP_M,
                                                                       READ_PAIRS)
            if expert >= 0:
                if valid > 0:
                    row_ok = lanes < valid
                    slots = pid_m * _BLOCK_M + r0 + lanes
                    if not GATE_UP:  # pair came in during the last tile; the weights come in during this one
                        weight = gl.load(TopkW + pair, mask=row_ok, other=0.0)
                    if FP8:
                        if GATE_UP:  # a padding row takes token 0's scales: its results are never read
                            a_rows = gl.where(row_ok, pair // top_k, 0)
                        else:
                            a_rows = slots
                        blk = expert * ws_e + (pid_n * BLOCK_N // _GROUP) * ws_n
                        c, acc_g, acc_u = _mma_steps_fp8(a_smem, g_smem, u_smem, ready, empty, c, k_steps, r0,
                                                         GATE_UP, layout, AScale + a_rows * a_scale_stride, WScale,
                                                         blk, blk + (up_off // _GROUP) * ws_n)
                    else:
                        c, acc_g, acc_u = _mma_steps(a_smem, g_smem, u_smem, ready, empty, c, k_steps, r0, GATE_UP,
                                                     layout)
                    if GATE_UP:
                        out = acc_g / (1.0 + gl.exp(-acc_g)) * acc_u
                        if FP8:  # BLOCK_N is one 128-channel group: N tile pid_n is group pid_n
                            out, scale = _quant_e4m3(out, ROUND)
                            gl.store(OutScale + slots * out_scale_stride + pid_n, scale)
                    else:
                        out = acc_g * weight[:, None]
                        if pid_n == 0:  # where the top-k sum finds each pair's row
                            gl.store(SlotOfPair + pair, slots, mask=row_ok)
                    # Every row of the tile, padding too: nothing reads the padding rows' results.
                    _store_tile(out.to(out_desc.dtype), epi.index(WG), out_desc, pid_m * _BLOCK_M + r0,
                                pid_n * BLOCK_N)
                else:
                    c = _skip_steps(ready, empty, c, k_steps, STAGES)
        tma.store_wait(0)  # the last copy has read its buffer before the program ends

    # max_blocks follows the call's size: not specialised (as in the Triton kernels), so that no call size
    # compiles anything after start-up's warm-up (`fused_moe.warmup_token_counts`).
    @gluon.jit(do_not_specialize=["max_blocks"])
    def _grouped_gemm_kernel(a_desc, a_half_desc, w_desc, out_desc, SlotOfPair, TopkW, Sorted, BlockExpert,
                             BlockRows, AScale, WScale, OutScale, max_blocks, num_n, k_steps, w_rows, up_off, top_k,
                             a_scale_stride, ws_e, ws_n, out_scale_stride, Ticket, GATE_UP: gl.constexpr,
                             STAGES: gl.constexpr, GROUP_M: gl.constexpr, FP8: gl.constexpr, ROUND: gl.constexpr,
                             HALF: gl.constexpr, DYNAMIC: gl.constexpr):
        dtype: gl.constexpr = a_desc.dtype
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK_M, BLOCK_K], a_desc.layout)
        g_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        if GATE_UP:
            u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        else:
            u_smem = g_smem
        epi = gl.allocate_shared_memory(out_desc.dtype, [2, _HALF_M, BLOCK_N], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups are done with the stage
        # DYNAMIC: the tile queue, two slots (the producer draws one tile ahead of the consumers).
        tiles = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        tile_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        tile_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(2):
            mbarrier.init(tile_ready.index(s), count=1)
            mbarrier.init(tile_empty.index(s), count=2)
        # The same function for both consumer partitions: WG (constexpr) picks the warpgroup's rows.
        gl.warp_specialize([
            (_consumer, (a_smem, g_smem, u_smem, epi, ready, empty, tiles, tile_ready, tile_empty, out_desc,
                         SlotOfPair, TopkW, Sorted, BlockExpert, BlockRows, AScale, WScale, OutScale, max_blocks,
                         num_n, k_steps, top_k, up_off, a_scale_stride, ws_e, ws_n, out_scale_stride,
                         gl.constexpr(0), GATE_UP, GROUP_M, FP8, ROUND, DYNAMIC)),
            (_consumer, (a_smem, g_smem, u_smem, epi, ready, empty, tiles, tile_ready, tile_empty, out_desc,
                         SlotOfPair, TopkW, Sorted, BlockExpert, BlockRows, AScale, WScale, OutScale, max_blocks,
                         num_n, k_steps, top_k, up_off, a_scale_stride, ws_e, ws_n, out_scale_stride,
                         gl.constexpr(1), GATE_UP, GROUP_M, FP8, ROUND, DYNAMIC)),
            (_loader, (a_desc, a_half_desc, w_desc, a_smem, g_smem, u_smem, ready, empty, tiles, tile_ready,
                       tile_empty, Ticket, BlockExpert, BlockRows, max_blocks, num_n, k_steps, w_rows, up_off, GATE_UP,
                       GROUP_M, HALF, DYNAMIC)),
        ], [4, 1], [232, 40])


# What gate/up rounds act to before quantising it (hidden's dtype).
_ROUND = {**gluon_support.GL_DTYPES, torch.float32: "float32"}


def _launch(a: torch.Tensor, w2d: torch.Tensor, out: torch.Tensor, slot_of_pair: torch.Tensor,
            topk_weights: torch.Tensor, routing, w_rows: int, up_off: int, n: int, k: int, block_n: int,
            block_k: int, stages: int, group_m: int, gate_up: bool, top_k: int = 1, a_scale=None, w_scale=None,
            out_scale=None, round_dtype: torch.dtype = torch.bfloat16, dynamic: bool = False) -> None:
    """One launch of the grouped GEMM over a [rows, k] (slot order) and w2d (the experts' weights stacked as
    [E * w_rows, k]). fp8 (a_scale given): a_scale [*, k / 128] rows by token (gate/up, which then also takes
    top_k) or by slot (down), w_scale [E, w_rows / 128, k / 128]; gate/up writes e4m3 act and its scales to
    out_scale [slots, n / 128], rounded to round_dtype first. dynamic: `GemmConfig.dynamic_tiles`; the ticket
    counter is the device's first completion counter (`counters.completion_counters`), 0 between launches."""
    num_n = n // block_n
    tiles = routing.max_blocks * num_n
    grid = (min(tiles, num_sms(a.device)),)
    fp8 = a_scale is not None
    if fp8:
        out_scale = a_scale if out_scale is None else out_scale  # down writes no scales: a pointer never written
        scales = (a_scale, w_scale, out_scale)
        strides = (a_scale.stride(0), w_scale.stride(0), w_scale.stride(1), out_scale.stride(0))
    else:  # pointers the kernel never reads
        scales, strides = (topk_weights, topk_weights, topk_weights), (0, 0, 0, 0)
    _grouped_gemm_kernel[grid](
        gluon_support.host_descriptor(a, [BLOCK_M, block_k]), gluon_support.host_descriptor(a, [HALF_M, block_k]),
        gluon_support.host_descriptor(w2d, [block_n, block_k]),
        gluon_support.host_descriptor(out, [HALF_M, block_n]),
        slot_of_pair, topk_weights, routing.sorted_ids, routing.block_expert, routing.block_rows, *scales,
        routing.max_blocks, num_n, k // block_k, w_rows, up_off, top_k, *strides, completion_counters(a.device, 1),
        GATE_UP=gate_up, STAGES=stages, GROUP_M=group_m, FP8=fp8, ROUND=getattr(gl, _ROUND[round_dtype]),
        HALF=HALF_A, DYNAMIC=dynamic, num_warps=4)


def gate_up_gluon(x_slots: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, routing, block_n: int,
                  block_k: int, stages: int, group_m: int, top_k: int = 1, x_scale=None, w13_scale=None,
                  act_scale=None, round_dtype: torch.dtype = torch.bfloat16, dynamic: bool = False) -> None:
    """act[slot] = silu(x_slots[slot] . w13[e, :I]) * (x_slots[slot] . w13[e, I:]) for the slots of every used
    block (x_slots: the token rows in slot order, `fused_moe_tma.gather_slots`). fp8: x_scale [M, H / 128] by
    token (top_k: choices a token), w13_scale's 128 x 128 blocks, and act e4m3 with its scales in act_scale
    (`fused_moe.gate_up`'s contract), quantised from act rounded to round_dtype. dynamic: tiles drawn from a
    counter (`GemmConfig.dynamic_tiles`)."""
    num_experts, two_i, hidden = w13.shape
    _launch(x_slots, w13.view(num_experts * two_i, hidden), act, act, act, routing, two_i, two_i // 2, two_i // 2,
            hidden, block_n, block_k, stages, group_m, True, top_k, x_scale, w13_scale, act_scale, round_dtype,
            dynamic)


def down_gluon(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, routing, block_n: int,
               block_k: int, stages: int, group_m: int, out_dtype: torch.dtype, act_scale=None,
               w2_scale=None, dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_slots, slot_of_pair): y_slots [slots, H] holds topk_weight[pair] * (act[slot] . w2[e]) in slot order
    (rows of padding slots hold junk), slot_of_pair [M*k] int32 the slot of each valid pair (others unset),
    for `fused_moe.topk_sum`. Rows by slot let the epilogue store whole tiles by TMA. fp8: act e4m3 with
    act_scale [slots, I / 128], w2_scale's 128 x 128 blocks. dynamic: as `gate_up_gluon`'s."""
    num_experts, hidden, inter = w2.shape
    y_slots = torch.empty(act.shape[0], hidden, dtype=out_dtype, device=act.device)
    slot_of_pair = torch.empty(topk_weights.numel(), dtype=torch.int32, device=act.device)
    _launch(act, w2.view(num_experts * hidden, inter), y_slots, slot_of_pair, topk_weights, routing, hidden, 0,
            hidden, inter, block_n, block_k, stages, group_m, False, 1, act_scale, w2_scale, dynamic=dynamic)
    return y_slots, slot_of_pair
