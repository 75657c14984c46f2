"""`mla_decode_attention(..., kernel="tma")` (MLA decode through TMA descriptors) against the pure-torch reference.

CPU: the kernel runs under the Triton interpreter (fp16; descriptors are emulated) in a subprocess, see
tests/interp.py. GPU (`gpu` mark): bf16, DeepSeek shapes, relative error <= 1e-2 against the fp32 reference,
and the Triton backend taking it where `use_mla_tma` says.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.forward_batch import AttentionMetadata
from moeserve.kernels.attention_reference import make_paged_cache, mla_decode_attention_ref, rel_err
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests

F16 = torch.float16


def poison_past_context(kv: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int]) -> None:
    """Fill the unused slots of each request's last page with NaN, as stale cache contents may be (a TMA tile
    cannot be masked, so a kernel must keep them out of its output)."""
    page = kv.shape[1]
    for i, n in enumerate(seq_lens):
        if n % page:
            kv[block_tables[i, n // page], n % page :] = float("nan")


def _run(seq_lens, page, block_n, splits, heads=16, lora=512, rope=64, dtype=F16, device="cpu", poison=False,
         scale=None, **kw) -> float:
    """Relative error of the TMA kernel against the reference on a random paged cache. poison: the unused
    slots of every request's last page hold NaN (a TMA tile cannot be masked, so the kernel must zero them).
    The default scale gives flat softmaxes; a large one, peaked rows whose max keeps growing."""
    from moeserve.kernels.mla_decode import mla_decode_attention

    kv, _, bt, sl = make_paged_cache(seq_lens, page, 1, lora + rope, None, dtype, device)
    if poison:
        poison_past_context(kv, bt, seq_lens)
    q = torch.randn(len(seq_lens), heads, lora + rope).to(dtype).to(device)
    scale = 0.3 / rope if scale is None else scale
    out = mla_decode_attention(q, kv, bt, sl, scale, lora, max(seq_lens), num_splits=splits,
                               block_n=block_n, kernel="tma", **kw)
    assert out.shape == (len(seq_lens), heads, lora) and out.dtype == dtype
    assert torch.isfinite(out).all()
    return rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, scale, lora))


# ---------------------------------------------------------------- interpreter (fp16, tiny shapes)

INTERP_KW = dict(block_h=16, num_warps=4)


@interp
@pytest.mark.parametrize("page,block_n", [(16, 16), (64, 32), (64, 64)])
def test_interp_one_split_ragged(page: int, block_n: int) -> None:
    """Context shorter than a tile, partial last tiles, and tiles spanning several pages of the table."""
    torch.manual_seed(page + block_n)
    assert _run([3, 40, 130], page, block_n, 1, **INTERP_KW) <= 5e-3


@interp
@pytest.mark.parametrize("splits", [3, 8])
def test_interp_split_kv_with_empty_splits(splits: int) -> None:
    """fp32 partials merged by split_reduce; 8 splits of a 5-token context leave most of them empty."""
    torch.manual_seed(splits)
    assert _run([5, 70, 97], 32, 16, splits, **INTERP_KW) <= 5e-3


@interp
def test_interp_ragged_heads_small_latent() -> None:
    """20 heads over two 16-head blocks (the second half empty), the smallest latent the kernel takes."""
    torch.manual_seed(1)
    assert _run([1, 33, 18], 16, 16, 2, heads=20, lora=32, rope=16, **INTERP_KW) <= 5e-3


@interp
def test_interp_nan_past_context_is_ignored() -> None:
    torch.manual_seed(2)
    assert _run([7, 45, 64], 64, 32, 1, poison=True, **INTERP_KW) <= 5e-3
    assert _run([7, 45, 64], 64, 32, 3, poison=True, **INTERP_KW) <= 5e-3


@interp
def test_interp_peaked_rows() -> None:
    """Logits with a spread of ~70 (log2 units): the running max grows mid-context, rescaling both halves."""
    torch.manual_seed(4)
    assert _run([3, 90, 128], 16, 16, 1, scale=0.4, **INTERP_KW) <= 5e-3
    assert _run([3, 90, 128], 32, 32, 2, scale=0.4, poison=True, **INTERP_KW) <= 5e-3


@interp
def test_interp_unsupported_inputs_say_why() -> None:
    from moeserve.kernels.mla_decode import mla_decode_attention, mla_tma_ok

    kv, _, bt, sl = make_paged_cache([20], 16, 1, 576, None, F16)
    q = torch.randn(1, 16, 576).to(F16)
    assert mla_tma_ok(q, kv, 16) and not mla_tma_ok(q, kv, 32) and not mla_tma_ok(q, kv, 8)
    assert not mla_tma_ok(q.float(), kv.float(), 16)
    with pytest.raises(ValueError, match="dividing the page size 16"):
        mla_decode_attention(q, kv, bt, sl, 0.1, 512, 20, block_n=32, kernel="tma")
    with pytest.raises(ValueError, match="kv_lora_rank must be"):
        mla_decode_attention(q, kv, bt, sl, 0.1, 448, 20, block_n=16, kernel="tma")


@launches_interpreter_run
def test_interpreter_cases() -> None:
    run_interpreter_tests(__file__)


def test_tma_path_needs_hopper_outside_the_interpreter() -> None:
    from moeserve.kernels.mla_decode import mla_tma_ok

    kv, _, _, _ = make_paged_cache([20], 16, 1, 576, None, F16)
    assert not mla_tma_ok(torch.randn(1, 16, 576).to(F16), kv, 16)  # CPU tensors, interpreter off


# ---------------------------------------------------------------- GPU, bf16, DeepSeek shapes

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="needs a Hopper (sm90+) GPU")
# The Gluon MLA kernel (tests/test_kernels_mla_gluon.py) is built for sm_90 only.
sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                          reason="needs a Hopper (sm_90) GPU")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("page,block_n", [(16, 16), (64, 64)])
def test_gpu_bf16_matches_reference(page: int, block_n: int) -> None:
    seq_lens = [2048] * 13 + [1, 77, 1500]
    torch.manual_seed(0)
    for splits, scale in ((None, None), (1, None), (None, 192**-0.5)):
        err = _run(seq_lens, page, block_n, splits, heads=128, dtype=torch.bfloat16, device="cuda", scale=scale)
        assert err <= 1e-2, (splits, err)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("page,heads,tma", [(64, 128, True), (16, 128, False), (64, 16, False)])
def test_gpu_triton_backend_takes_tma_kernel_where_it_pays(page: int, heads: int, tma: bool, monkeypatch) -> None:
    """With the Gluon kernel off (it takes this latent on Hopper otherwise): 64-key tiles and >= 64 heads take
    the TMA kernel, everything else the pointer kernel. Same results either way."""
    from moeserve.attention.triton_backend import TritonAttentionBackend
    from moeserve.kernels.mla_decode import use_mla_tma

    monkeypatch.setenv("MOESERVE_MLA_GLUON", "0")
    seq_lens = [300, 1, 64, 1000]
    kv, _, bt, sl = make_paged_cache(seq_lens, page, 1, 576, None, torch.bfloat16, "cuda")
    q = torch.randn(len(seq_lens), heads, 576, device="cuda", dtype=torch.bfloat16)
    assert use_mla_tma(q, kv) == tma
    meta = AttentionMetadata.for_decode(bt, sl, page)
    out = TritonAttentionBackend().attend(q, kv, kv[..., :512], meta, 192**-0.5)
    assert rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, 192**-0.5, 512)) <= 1e-2


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("kernel", ["tma", pytest.param("gluon", marks=sm90)])
def test_gpu_cuda_graph_replay_follows_new_inputs(kernel: str) -> None:
    """Captured once, replayed after the query and context lengths change in place (descriptors are baked into
    the graph and must stay valid); the Triton TMA kernel and the Gluon one (tests/test_kernels_mla_gluon.py)."""
    from moeserve.kernels.mla_decode import mla_decode_attention

    seq_lens = [1024] * 8
    kv, _, bt, sl = make_paged_cache(seq_lens, 64, 1, 576, None, torch.bfloat16, "cuda")
    q = torch.randn(8, 16, 576, device="cuda", dtype=torch.bfloat16)
    call = lambda: mla_decode_attention(q, kv, bt, sl, 192**-0.5, 512, 1024, num_splits=4,  # noqa: E731
                                        kernel=kernel)
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([1000, 3, 64, 65, 1024, 500, 1, 999], dtype=torch.int32, device="cuda"))
    graph.replay()
    assert rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, 192**-0.5, 512)) <= 1e-2
