"""Triton paged-attention kernels and `TritonAttentionBackend` against the pure-torch references.

CPU: the kernels run under the Triton interpreter (fp16/fp32, tiny shapes). The interpreter must be switched
on before triton is first imported, and other test files may import triton first, so all interpreter cases run
in one subprocess (this file run as a script) and each pytest case checks its own entry of that run's report.
GPU (`gpu` mark): bf16 at the benchmark's target shapes, relative error <= 1e-2 against the fp32 reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeserve.kernels.attention_reference import make_paged_cache, query_start_loc, rel_err

F16, F32 = torch.float16, torch.float32
TOL = {F16: 5e-3, F32: 1e-4}


# ---------------------------------------------------------------- interpreter cases (run in the subprocess)


def _case_decode(dtype, group, dk, dv, page, seq_lens, splits, block_n=16):
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import paged_decode_attention_ref

    kv_heads = 2
    k, v, bt, sl = make_paged_cache(seq_lens, page, kv_heads, dk, dv, dtype)
    q = torch.randn(len(seq_lens), kv_heads * group, dk).to(dtype)
    out = paged_decode_attention(q, k, v, bt, sl, dk**-0.5, max(seq_lens), num_splits=splits, block_n=block_n)
    assert out.dtype == dtype and out.shape == (len(seq_lens), kv_heads * group, dv)
    return rel_err(out, paged_decode_attention_ref(q, k, v, bt, sl, dk**-0.5))


def _case_decode_fused(dtype, group, dk, dv, page, seq_lens, splits):
    """The merge inside the decode launch against the `split_reduce` launch (the same math, summed in another
    order) and the reference; the completion counters are left at 0."""
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import paged_decode_attention_ref
    from moeserve.kernels.counters import completion_counters

    k, v, bt, sl = make_paged_cache(seq_lens, page, 2, dk, dv, dtype)
    q = torch.randn(len(seq_lens), 2 * group, dk).to(dtype)
    outs = [paged_decode_attention(q, k, v, bt, sl, dk**-0.5, max(seq_lens), num_splits=splits, block_n=16,
                                   fused_reduce=fused) for fused in (True, False)]
    torch.testing.assert_close(outs[0], outs[1], atol=TOL[dtype], rtol=TOL[dtype])
    if completion_counters(q.device, 1).any():
        raise AssertionError("completion counters not reset")
    return rel_err(outs[0], paged_decode_attention_ref(q, k, v, bt, sl, dk**-0.5))


def _case_mla_decode(dtype, heads, splits, block_h=16):
    from moeserve.kernels.attention_reference import mla_decode_attention_ref
    from moeserve.kernels.mla_decode import mla_decode_attention

    lora, rope, seq_lens = 32, 16, [1, 19, 40, 8]
    kv, _, bt, sl = make_paged_cache(seq_lens, 8, 1, lora + rope, None, dtype)
    q = torch.randn(len(seq_lens), heads, lora + rope).to(dtype)
    out = mla_decode_attention(q, kv, bt, sl, 0.3, lora, max(seq_lens), num_splits=splits, block_n=16,
                               block_h=block_h, num_warps=4)
    return rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, 0.3, lora))


def _case_extend(dtype, group, dk, dv, mla=False):
    from moeserve.kernels.attention_prefill import extend_attention
    from moeserve.kernels.attention_reference import paged_attention_ref

    prefix, new = [0, 5, 17, 3], [6, 1, 21, 16]
    seq_lens = [p + n for p, n in zip(prefix, new)]
    kv_heads = 1 if mla else 2
    k, v, bt, sl = make_paged_cache(seq_lens, 4, kv_heads, dk, None if mla else dv, dtype)
    if mla:
        v = k[..., :dv]
    q = torch.randn(sum(new), kv_heads * group, dk).to(dtype)
    qsl = query_start_loc(new)
    out = extend_attention(q, k, v, qsl, sl, bt, 0.25, max(new), block_m=16, block_n=16, num_warps=4)
    return rel_err(out, paged_attention_ref(q, k, v, qsl, sl, bt, 0.25))


def _case_backend(dtype, mla, decode):
    """write_kv + attend through both backends on a batch built the way the runner builds it."""
    from moeserve.attention.torch_backend import TorchAttentionBackend
    from moeserve.attention.triton_backend import TritonAttentionBackend
    from moeserve.forward_batch import build_forward_batch

    page, cached = 4, [3, 9, 0]
    new = [1, 1, 1] if decode else [5, 1, 7]
    heads, kv_heads, dk, dv = (16, 1, 48, 32) if mla else (8, 2, 32, 32)
    k_cache, v_cache, _, _ = make_paged_cache([40], page, kv_heads, dk, None if mla else dv, dtype)
    if mla:
        v_cache = k_cache[..., :dv]
    blocks = torch.randperm(k_cache.shape[0]).tolist()
    tables, used = [], 0
    for c, n in zip(cached, new):
        count = (c + n + page - 1) // page
        tables.append(blocks[used : used + count])
        used += count
    batch = build_forward_batch([[0] * n for n in new], cached, tables, page)
    meta, t = batch.attn, sum(new)
    k_new = torch.randn(t, kv_heads, dk).to(dtype)
    v_new = None if mla else torch.randn(t, kv_heads, dv).to(dtype)
    q = torch.randn(t, heads, dk).to(dtype)
    outs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        kc, vc = k_cache.clone(), None if mla else v_cache.clone()
        vc = kc[..., :dv] if mla else vc
        backend.write_kv(kc, None if mla else vc, k_new, v_new, meta)
        outs.append(backend.attend(q, kc, vc, meta, dk**-0.5))
    assert outs[1].shape == (t, heads, dv) and outs[1].dtype == dtype
    return rel_err(outs[1], outs[0])


INTERPRETER_CASES = {
    # name: (dtype, case); decode args: group, head_dim_k, head_dim_v, page, context lengths, splits
    "decode_gqa4_fp16_page8_one_split": (F16, lambda d: _case_decode(d, 4, 32, 32, 8, [1, 7, 33, 20], 1)),
    "decode_gqa4_fp16_page8_splits3": (F16, lambda d: _case_decode(d, 4, 32, 32, 8, [1, 7, 33, 20], 3)),
    "decode_mha_fp32_page4_dim24_splits4": (F32, lambda d: _case_decode(d, 1, 24, 24, 4, [2, 13, 30], 4)),
    "decode_gqa32_fp16_two_head_blocks": (F16, lambda d: _case_decode(d, 32, 16, 32, 16, [5, 50], 2)),
    # the split cap with the default tiles, `choose_block_n`'s 64 tokens a k step (a graph of few requests)
    "decode_gqa4_fp16_32_splits_default_tiles": (
        F16, lambda d: _case_decode(d, 4, 32, 32, 8, [1, 70, 300, 2100], 32, block_n=None)),
    # fused merge: group, head_dim_k, head_dim_v, page, context lengths (short ones leave splits empty), splits
    "decode_fused_gqa4_fp16_splits3": (F16, lambda d: _case_decode_fused(d, 4, 32, 32, 8, [1, 7, 33, 20], 3)),
    "decode_fused_mha_fp32_splits5_empty": (F32, lambda d: _case_decode_fused(d, 1, 24, 24, 4, [2, 13, 70], 5)),
    "decode_fused_gqa24_fp16_ragged_head_blocks": (F16, lambda d: _case_decode_fused(d, 24, 16, 16, 16, [5, 50], 2)),
    "decode_fused_gqa32_fp32_two_head_blocks": (F32, lambda d: _case_decode_fused(d, 32, 16, 32, 16, [40, 3], 3)),
    "mla_decode_fp16_one_split": (torch.float16, lambda d: _case_mla_decode(d, 16, 1)),
    "mla_decode_fp32_splits3_ragged_heads": (torch.float32, lambda d: _case_mla_decode(d, 20, 3)),
    "extend_gqa4_fp16": (torch.float16, lambda d: _case_extend(d, 4, 32, 32)),
    "extend_mha_fp32_dim24": (torch.float32, lambda d: _case_extend(d, 1, 24, 24)),
    "extend_mla_fp16": (torch.float16, lambda d: _case_extend(d, 16, 48, 32, mla=True)),
    "backend_decode_gqa_fp16": (torch.float16, lambda d: _case_backend(d, mla=False, decode=True)),
    "backend_extend_gqa_fp32": (torch.float32, lambda d: _case_backend(d, mla=False, decode=False)),
    "backend_decode_mla_fp16": (torch.float16, lambda d: _case_backend(d, mla=True, decode=True)),
    "backend_extend_mla_fp16": (torch.float16, lambda d: _case_backend(d, mla=True, decode=False)),
}


def _run_interpreter_cases() -> dict[str, str | float]:
    """Runs in the subprocess: relative error per case, or the exception text."""
    results: dict[str, str | float] = {}
    for seed, (name, (dtype, case)) in enumerate(INTERPRETER_CASES.items()):
        torch.manual_seed(seed)
        try:
            results[name] = case(dtype)
        except Exception as exc:  # reported per case by the parent
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_interpreter_matches_reference(interpreter_report: dict, name: str) -> None:
    err = interpreter_report[name]
    assert not isinstance(err, str), err
    assert err <= TOL[INTERPRETER_CASES[name][0]], f"{name}: relative error {err:.2e}"


def test_gqa_split_rule_allows_one_step_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 132-multiprocessor H100, Qwen3-30B-A3B's 32/4 heads: a small batch splits its context down to one
    k step per split, up to the cap, even where the context limit is short (a CUDA graph is sized for it); large
    batches keep few splits; a split never starts past the context limit."""
    from moeserve.kernels import attention_decode as ad

    monkeypatch.setattr(ad, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert ad.gqa_num_splits(1, 32, 4, 1344, cpu) == ad.MAX_SPLITS  # was 11 (four 32-token steps at least)
    assert ad.gqa_num_splits(1, 32, 4, 40960, cpu) == ad.MAX_SPLITS
    assert ad.gqa_num_splits(1, 32, 4, 100, cpu) == 4  # ceil(100 / 32): one step each
    assert ad.gqa_num_splits(10, 32, 4, 1344, cpu) == 14  # 4 programs a multiprocessor
    assert ad.gqa_num_splits(64, 32, 4, 1344, cpu) == 3
    assert ad.gqa_num_splits(1, 32, 32, 4096, cpu) == 17  # MHA: 32 programs a request
    for batch in (1, 2, 4, 16):
        for limit in (1, 17, 64, 1344, 40960):
            splits = ad.gqa_num_splits(batch, 32, 4, limit, cpu)
            assert 1 <= splits <= ad.MAX_SPLITS and (splits - 1) * ad.DEFAULT_BLOCK_N < limit


# ---------------------------------------------------------------- GPU, bf16, target shapes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page", [16, 64])
def test_gpu_decode_gqa_bf16(page: int) -> None:
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import paged_decode_attention_ref

    seq_lens = [4096] * 60 + [1, 17, 1000, 4095]  # ragged tail: partial pages and short requests
    k, v, bt, sl = make_paged_cache(seq_lens, page, 4, 128, 128, torch.bfloat16, "cuda")
    q = torch.randn(len(seq_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, k, v, bt, sl, 128**-0.5, max(seq_lens))
    assert rel_err(out, paged_decode_attention_ref(q, k, v, bt, sl, 128**-0.5)) <= 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch,splits", [(1, 32), (1, 8), (16, 9), (64, 3)])
def test_gpu_decode_fused_reduce_bf16(batch: int, splits: int) -> None:
    """Qwen3-30B-A3B decode shapes at the split counts a graph runner uses: the merge in the decode launch
    agrees with the two-launch path and the reference (short requests leave most splits empty)."""
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import paged_decode_attention_ref

    seq_lens = [1024] * max(1, batch - 2) + [17, 333][: batch - 1]
    k, v, bt, sl = make_paged_cache(seq_lens, 16, 4, 128, 128, torch.bfloat16, "cuda")
    q = torch.randn(len(seq_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    fused, two = (paged_decode_attention(q, k, v, bt, sl, 128**-0.5, 1024, num_splits=splits, fused_reduce=f)
                  for f in (True, False))
    torch.testing.assert_close(fused, two, atol=1e-2, rtol=1e-2)
    assert rel_err(fused, paged_decode_attention_ref(q, k, v, bt, sl, 128**-0.5)) <= 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_mla_decode_bf16() -> None:
    from moeserve.kernels.attention_reference import mla_decode_attention_ref
    from moeserve.kernels.mla_decode import mla_decode_attention

    seq_lens = [4096] * 62 + [3, 2049]
    kv, _, bt, sl = make_paged_cache(seq_lens, 16, 1, 576, None, torch.bfloat16, "cuda")
    q = torch.randn(len(seq_lens), 128, 576, device="cuda", dtype=torch.bfloat16)
    out = mla_decode_attention(q, kv, bt, sl, 192**-0.5, 512, max(seq_lens))
    assert rel_err(out, mla_decode_attention_ref(q, kv, bt, sl, 192**-0.5, 512)) <= 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mla", [False, True])
def test_gpu_extend_with_prefix_bf16(mla: bool) -> None:
    from moeserve.kernels.attention_prefill import extend_attention
    from moeserve.kernels.attention_reference import paged_attention_ref

    prefix, new = [0, 1000, 3001], [700, 333, 64]
    seq_lens = [p + n for p, n in zip(prefix, new)]
    heads, kv_heads, dk, dv = (128, 1, 576, 512) if mla else (32, 4, 128, 128)
    k, v, bt, sl = make_paged_cache(seq_lens, 16, kv_heads, dk, None if mla else dv, torch.bfloat16, "cuda")
    v = k[..., :dv] if mla else v
    q = torch.randn(sum(new), heads, dk, device="cuda", dtype=torch.bfloat16)
    qsl = query_start_loc(new, "cuda")
    out = extend_attention(q, k, v, qsl, sl, bt, dk**-0.5, max(new))
    assert rel_err(out, paged_attention_ref(q, k, v, qsl, sl, bt, dk**-0.5)) <= 1e-2


if __name__ == "__main__":  # the interpreter subprocess
    print(json.dumps(_run_interpreter_cases()))
