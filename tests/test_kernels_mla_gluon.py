"""`mla_decode_attention(..., kernel="gluon")` (the warp-specialised Gluon MLA decode kernel) against the pure-torch
reference: ragged contexts, stale NaN past each context, split-KV with empty splits, head counts that do not
fill the 64-head programs, peaked softmax rows; the backend's and the engine's use of it (CUDA-graph replay:
tests/test_kernels_mla_tma.py). GPU tests need a Hopper (sm_90) GPU; on CPU the call says why it cannot run.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.attention_reference import make_paged_cache, mla_decode_attention_ref, rel_err
from tests.test_kernels_mla_tma import poison_past_context, sm90

BF16 = torch.bfloat16
SCALE = 192**-0.5


def _inputs(seq_lens, heads, page=64, poison=False, seed=0):
    kv, _, bt, sl = make_paged_cache(seq_lens, page, 1, 576, None, BF16, "cuda", seed=seed)
    if poison:
        poison_past_context(kv, bt, seq_lens)
    q = torch.randn(len(seq_lens), heads, 576, generator=torch.Generator().manual_seed(seed)).to(BF16).cuda()
    return q, kv, bt, sl


def _gluon(q, kv, bt, sl, splits, scale=SCALE) -> torch.Tensor:
    """The Gluon kernel's output, checked for shape, dtype and finiteness."""
    from moeserve.kernels.mla_decode import mla_decode_attention

    out = mla_decode_attention(q, kv, bt, sl, scale, 512, int(sl.max()), num_splits=splits, kernel="gluon")
    assert out.shape == (q.shape[0], q.shape[1], 512) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    return out


def _err(q, kv, bt, sl, splits, scale=SCALE) -> float:
    return rel_err(_gluon(q, kv, bt, sl, splits, scale), mla_decode_attention_ref(q, kv, bt, sl, scale, 512))


def test_unsupported_inputs_say_why() -> None:
    """Off a Hopper GPU the explicit call says why, and the backend's choice falls back to the Triton kernels."""
    from moeserve.kernels.mla_decode import mla_decode_attention, use_mla_gluon
    from moeserve.kernels.mla_decode_gluon import mla_gluon_unsupported

    kv, _, bt, sl = make_paged_cache([20], 64, 1, 576, None, BF16)
    q = torch.randn(1, 64, 576).to(BF16)
    with pytest.raises(ValueError, match="kernel='gluon'"):
        mla_decode_attention(q, kv, bt, sl, SCALE, 512, 20, kernel="gluon")
    with pytest.raises(ValueError, match=r"kernel must be one of \('ptr', 'tma', 'gluon', 'auto'\), got 'fast'"):
        mla_decode_attention(q, kv, bt, sl, SCALE, 512, 20, kernel="fast")
    assert "Hopper" in mla_gluon_unsupported(q, kv, 512) or "Gluon" in mla_gluon_unsupported(q, kv, 512)
    assert not use_mla_gluon(q, kv, 512)


@pytest.fixture
def gluon_launches(monkeypatch) -> list:
    """The q shapes of every Gluon kernel launch from here on (the launcher is looked up at each call)."""
    from moeserve.kernels import mla_decode_gluon

    launches = []
    launch = mla_decode_gluon.launch_mla_decode_gluon

    def counting_launch(q, *args, **kw):
        launches.append(tuple(q.shape))
        launch(q, *args, **kw)

    monkeypatch.setattr(mla_decode_gluon, "launch_mla_decode_gluon", counting_launch)
    return launches


def test_inputs_the_kernel_cannot_take_are_named() -> None:
    """Shapes, dtypes, pages and cache layouts the kernel does not take each get their reason (on any machine:
    the input checks come before the platform's)."""
    from moeserve.kernels.mla_decode_gluon import mla_gluon_input_problem as problem

    def cache(page, seq=70, dk=576):
        return make_paged_cache([seq], page, 1, dk, None, BF16)[0]

    q = torch.randn(1, 64, 576).to(BF16)
    for page in (16, 32, 64, 128):
        assert problem(q, cache(page), 512) is None, page
    for page in (8, 48):
        assert "multiple of 64" in problem(q, cache(page), 512)
    assert "kv_lora_rank" in problem(q, cache(64), 448)
    assert "kv_lora_rank" in problem(torch.randn(1, 64, 320).to(BF16), cache(64, dk=320), 256)
    assert "16-bit" in problem(q.float(), cache(64).float(), 512)
    assert "share" in problem(q.half(), cache(64), 512)
    assert "want q" in problem(q[0], cache(64), 512)
    padded = torch.zeros(3, 64, 1, 584, dtype=BF16)[..., :576]  # rows 584 apart: still evenly spaced
    assert problem(q, padded, 512) is None
    assert "evenly spaced" in problem(q, torch.zeros(3, 65, 1, 576, dtype=BF16)[:, :64], 512)
    assert "16-byte" in problem(q, torch.zeros(3, 64, 1, 580, dtype=BF16)[..., :576], 512)
    assert "16-byte" in problem(q, torch.zeros(3 * 64 * 576 + 1, dtype=BF16)[1:].view(3, 64, 1, 576), 512)


def test_backend_says_which_mla_kernel_runs_and_why(monkeypatch, caplog) -> None:
    """The attention backend logs its MLA decode kernel once, with the reason the Gluon kernel is not taken."""
    from moeserve.attention.triton_backend import TritonAttentionBackend

    kv, _, _, _ = make_paged_cache([20], 16, 1, 576, None, BF16)
    q = torch.randn(1, 16, 576).to(BF16)
    backend = TritonAttentionBackend()
    with caplog.at_level("INFO", logger="moeserve.attention.triton_backend"):
        line = backend.log_mla_kernel(q, kv, 512)
    assert "Triton kernel (pointer loads); not the Gluon kernel: q is on cpu" in line and line in caplog.text
    monkeypatch.setenv("MOESERVE_MLA_GLUON", "0")
    assert backend.log_mla_kernel(q, kv, 512).endswith("MOESERVE_MLA_GLUON=0")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("heads,page", [(128, 64), (16, 64), (80, 64), (128, 16), (16, 16), (128, 32), (128, 128)])
def test_gpu_ragged_contexts_with_stale_nan(heads: int, page: int) -> None:
    """Contexts of 1 key, under one tile, exact tiles and long ones; 16 and 80 heads leave programs part-empty;
    pages under 64 keys make a tile of several pages, whose last page may end the request's block table."""
    q, kv, bt, sl = _inputs([1, 3, 64, 65, 130, 1000, 4096], heads, page=page, poison=True, seed=heads + page)
    for splits in (1, None):
        assert _err(q, kv, bt, sl, splits) <= 1e-2, splits


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("splits", [3, 8])
def test_gpu_split_kv_with_empty_splits(splits: int) -> None:
    """fp32 partials merged by split_reduce; 8 splits of a 5-token context leave most of them empty."""
    q, kv, bt, sl = _inputs([5, 70, 997], 128, page=16, poison=True, seed=splits)
    assert _err(q, kv, bt, sl, splits) <= 1e-2


@pytest.mark.gpu
@sm90
def test_gpu_peaked_rows_and_long_context_match_the_tma_kernel() -> None:
    """A large scale makes each row's max keep growing (the rescale path); at the benchmark shape (B64,
    context 4096, 128 heads) the result equals the Triton TMA kernel's within bf16 rounding."""
    from moeserve.kernels.mla_decode import mla_decode_attention

    q, kv, bt, sl = _inputs([4096] * 64, 128, seed=1)
    assert _err(q, kv, bt, sl, None, scale=1.0) <= 1e-2
    ours = _gluon(q, kv, bt, sl, None)
    assert rel_err(ours, mla_decode_attention_ref(q, kv, bt, sl, SCALE, 512)) <= 1e-2
    assert rel_err(ours, mla_decode_attention(q, kv, bt, sl, SCALE, 512, 4096, kernel="tma")) <= 1e-2


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("page,heads", [(64, 128), (16, 16)])
def test_gpu_triton_backend_takes_the_gluon_kernel(page: int, heads: int, gluon_launches: list) -> None:
    """The attention backend's decode runs the Gluon kernel for DeepSeek's latent on Hopper, any head count."""
    from moeserve.attention.triton_backend import TritonAttentionBackend
    from moeserve.forward_batch import AttentionMetadata
    from moeserve.kernels.mla_decode import use_mla_gluon

    q, kv, bt, sl = _inputs([300, 1, 64, 1000], heads, page=page)
    assert use_mla_gluon(q, kv, 512)
    out = TritonAttentionBackend().attend(q, kv, kv[..., :512], AttentionMetadata.for_decode(bt, sl, page), SCALE)
    assert gluon_launches == [tuple(q.shape)]
    assert TritonAttentionBackend().log_mla_kernel(q, kv, 512).endswith("the warp-specialised Gluon kernel (Hopper)")
    assert rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, SCALE, 512)) <= 1e-2


@pytest.mark.gpu
@sm90
def test_gpu_engine_decodes_through_the_gluon_kernel(tiny_checkpoint, monkeypatch, gluon_launches: list) -> None:
    """A DeepSeek-V2 model with the 512 + 64 latent decodes through the Gluon kernel (in its CUDA graphs) and
    generates what it generates with the kernel off (MOESERVE_MLA_GLUON=0: the Triton kernel), up to bf16
    near-ties."""
    from tests.test_flashinfer_backend import ENGINE_SHAPES
    from tests.test_gpu_engine import assert_greedy_agree_up_to_ties, engine_greedy_outputs

    def has_graphs(llm) -> None:
        assert llm.engine.runner.graphs is not None

    path = str(tiny_checkpoint("deepseek_v2", **ENGINE_SHAPES["deepseek_v2"]))
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MOESERVE_MLA_GLUON", flag)
        gluon_launches.clear()
        outs[flag] = engine_greedy_outputs(path, 5, has_graphs)
        assert bool(gluon_launches) == (flag == "1"), gluon_launches
    assert_greedy_agree_up_to_ties(outs["1"], outs["0"], min_identical=3)  # half the prompts
