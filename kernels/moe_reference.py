"""Pure-torch reference for `fused_moe`: the routed expert MLP, weighted and summed over top-k.

Semantics: out[m] = sum_j topk_weights[m, j] * W2_e @ (silu(G_e @ x_m) * (U_e @ x_m)), e = topk_ids[m, j],
where w13[e] holds the gate rows G_e first and then the up rows U_e; choices with id -1 (expert not on this
rank) are skipped. With FP8 weights the reference dequantises them and quantises activations exactly as the
kernel does (per token per 128 channels), so the two differ only by accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import dequant_token_group_fp8, dequant_weight_block_fp8, per_token_group_quant_fp8_reference


def _quant_dequant(x: torch.Tensor) -> torch.Tensor:
    q, s = per_token_group_quant_fp8_reference(x)
    return dequant_token_group_fp8(q, s)


def moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """hidden: [M, H]; w13: [E, 2I, H]; w2: [E, H, I] (bf16/fp16/fp32, or float8_e4m3fn with
    w13_scale: [E, ceil(2I/128), ceil(H/128)] and w2_scale: [E, ceil(H/128), ceil(I/128)] float32);
    topk_weights: [M, k] float32; topk_ids: [M, k] int, -1 = skip.
    compute_dtype: matmul dtype (default hidden's; float32 or float64 for a high-precision reference).
    Returns [M, H] in hidden's dtype; per-pair results are summed in float32 (or compute_dtype if wider)."""
    fp8 = w13.dtype == torch.float8_e4m3fn
    cdt = compute_dtype or (torch.float32 if fp8 else hidden.dtype)
    acc_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=acc_dtype, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        if e < 0 or e >= w13.shape[0]:
            continue
        pairs = (flat_ids == e).nonzero(as_tuple=True)[0]
        tokens = pairs // top_k
        x = hidden[tokens]
        if fp8:
            g13 = dequant_weight_block_fp8(w13[e], w13_scale[e]).to(cdt)
            g2 = dequant_weight_block_fp8(w2[e], w2_scale[e]).to(cdt)
            x = _quant_dequant(x)
        else:
            g13, g2 = w13[e].to(cdt), w2[e].to(cdt)
        gate_up = x.to(cdt) @ g13.t()
        act = (F.silu(gate_up[:, :inter].to(acc_dtype)) * gate_up[:, inter:].to(acc_dtype)).to(hidden.dtype)
        if fp8:
            act = _quant_dequant(act)
        y = act.to(cdt) @ g2.t()
        out.index_add_(0, tokens, y.to(acc_dtype) * flat_w[pairs, None].to(acc_dtype))
    return out.to(hidden.dtype)
