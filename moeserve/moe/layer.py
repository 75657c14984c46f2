"""The MoE layer: gate -> select experts -> placement -> dispatch -> experts -> combine (+ shared experts).

This rank stores only its physical slots' experts: ``w13 [num_local_slots, 2*I, H]`` (gate rows, then up rows)
and ``w2 [num_local_slots, H, I]``; slot s holds logical expert ``placement.local_logical_experts(layer)[s]``.
A replicated expert occupies several slots, each with its own copy of the weights.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.forward_batch import ForwardBatch
from moeserve.layers.linear import Linear
from moeserve.moe.routing import RoutingConfig, fused_router_applies, select_experts
from moeserve.moe.tbo import drive

if TYPE_CHECKING:
    from moeserve.models.base import ModelContext


class Router(nn.Module):
    """The gate. weight: [E, H]; e_score_correction_bias: [E] float32 (DeepSeek-V3) or None.

    fp32: compute the logits in float32 from a float32 weight (DeepSeek); otherwise in the model dtype,
    upcast afterwards (Qwen, Mixtral) — each as its reference implementation does.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, fp32: bool, correction_bias: bool) -> None:
        super().__init__()
        self.fp32 = fp32
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32 if fp32 else None)
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> router logits [T, E]: float32 (fp32 routers), else x's dtype — `select_experts`
        upcasts before the softmax, as the reference implementations do (one launch fewer per layer)."""
        if self.fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight)

    @property
    def observed(self) -> bool:
        """Whether a forward hook wants the logits (e.g. a benchmark counting experts): then they must be
        computed by `forward`, not fused away."""
        return bool(
            self._forward_hooks or self._forward_pre_hooks
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        )


class MoELayer(nn.Module):
    """One sparse MLP block. `layer_idx` is its placement row: the MoE layer's ordinal, not the decoder index.

    Shared experts (optional): `shared_mlp` runs on every token while routed tokens travel; it is registered
    as `shared_name` (DeepSeek "shared_experts", Qwen2-MoE "shared_expert"), and with `shared_gate` its output
    is scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE).
    expert_proj_names: the checkpoint's names of the gate, up and down projections of one expert.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        routing: RoutingConfig,
        layer_idx: int,
        ctx: ModelContext,
        *,
        gate_fp32: bool = False,
        correction_bias: bool = False,
        shared_mlp: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_gate: bool = False,
        expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        placement = ctx.placement
        if placement.num_logical != num_experts:
            raise ValueError(
                f"placement has {placement.num_logical} logical experts, the model {num_experts}"
            )
        if layer_idx >= placement.num_layers:
            raise ValueError(
                f"placement has {placement.num_layers} layer rows but MoE layer ordinal {layer_idx} "
                "needs a row "
                "(rows are MoE-layer ordinals: build the placement with ModelConfig.num_moe_layers rows)"
            )
        if ctx.dispatcher.num_local_slots != placement.num_local_slots:
            raise ValueError(
                f"dispatcher has {ctx.dispatcher.num_local_slots} local slots, "
                f"placement {placement.num_local_slots}"
            )
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.routing = routing
        self.placement, self.dispatcher, self.expert_kernel = placement, ctx.dispatcher, ctx.expert_kernel
        self.dispatchers = ctx.dispatchers  # one instance per two-batch-overlap micro-batch
        self.set_local_experts(placement.local_logical_experts(layer_idx))
        self.expert_proj_names = expert_proj_names

        self.gate = Router(hidden_size, num_experts, fp32=gate_fp32, correction_bias=correction_bias)
        slots = len(self.local_experts)
        self.w13 = nn.Parameter(torch.empty(slots, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(slots, hidden_size, intermediate_size), requires_grad=False)
        self.shared_name = shared_name if shared_mlp is not None else None
        if shared_mlp is not None:
            setattr(self, shared_name, shared_mlp)
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x: [T, H] -> [T, H]. Enters the dispatcher even when T == 0 (EP ranks step together)."""
        return drive(self.forward_stages(x, batch))

    def forward_stages(self, x: torch.Tensor, batch: ForwardBatch) -> Generator[None, None, torch.Tensor]:
        """The layer as stages, yielding while tokens travel (two-batch overlap runs the other micro-batch
        there): route, dispatch send | yield | receive, experts, combine send | yield | receive."""
        weights, ids = self.route(x, batch.num_real_tokens)
        phys = self.placement.to_physical(self.layer_idx, ids)
        self._record_load(phys, batch)
        dispatcher = self.dispatchers[batch.micro_batch]
        pending = dispatcher.dispatch_begin(x, phys, weights, batch.mode)
        shared = self._shared(x)  # overlaps the dispatch's communication
        yield
        out = dispatcher.dispatch_end(pending)
        y = self.expert_kernel(out.hidden, self.w13, self.w2, out.topk_weights, out.topk_ids,
                               num_pairs=out.num_pairs)
        pending = dispatcher.combine_begin(y, out.handle)
        yield
        y = dispatcher.combine_end(pending)
        return y if shared is None else y + shared

    @torch.no_grad()
    def warm_up(self, max_tokens: int, seed: int = 0) -> list[int]:
        """Run the router and the expert kernel once at each token count that the kernel
        (`ExpertKernel.warmup_token_counts`) or the fused router (`router_topk.warmup_token_counts`) names for
        calls of up to max_tokens rows, so that Triton compiles their kernels now rather than inside a first
        request of that size. Random activations; each row chooses top_k distinct local slots at random (all
        of them when this rank holds fewer). Local to this rank: no dispatch, no collective, no expert load
        recorded, no weight or cache written. Returns the counts run, ascending."""
        device, slots, top_k = self.w13.device, self.w13.shape[0], self.routing.top_k
        counts = set(self.expert_kernel.warmup_token_counts(self.w13, max_tokens, top_k))
        if self._fused_route(torch.empty(1, self.hidden_size, dtype=self.w13.dtype, device=device)):
            from moeserve.kernels.device import num_sms
            from moeserve.kernels.router_topk import warmup_token_counts

            weight = self.gate.weight
            counts.update(warmup_token_counts(max_tokens, weight.shape[0], weight.shape[1], top_k, num_sms(device)))
        counts = sorted(counts)
        gen = torch.Generator(device=device).manual_seed(seed)
        for n in counts:
            x = torch.randn(n, self.hidden_size, generator=gen, device=device).to(self.w13.dtype)
            weights, _ = self.route(x)
            ids = torch.full((n, top_k), -1, dtype=torch.int32, device=device)
            chosen = torch.rand(n, slots, generator=gen, device=device).topk(min(top_k, slots), dim=1).indices
            ids[:, : chosen.shape[1]] = chosen.to(torch.int32)
            self.expert_kernel(x, self.w13, self.w2, weights, ids)
        return counts

    def route(
        self, x: torch.Tensor, num_real_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_weights [T, k] float32, topk_ids [T, k] int32, logical ids): the gate, then
        `select`. Decode-sized CUDA batches whose routing `topk_softmax` covers run both in one launch
        (`router_topk`), unless a hook observes the gate's logits; CPU keeps the unfused path unchanged."""
        r, gate = self.routing, self.gate
        if self._fused_route(x):
            from moeserve.kernels.router_topk import router_topk

            return router_topk(
                x, gate.weight, r.top_k, renormalize=r.renormalize, scaling_factor=r.routed_scaling_factor,
                num_real_tokens=num_real_tokens,
            )
        return self.select(gate(x), num_real_tokens)

    def _fused_route(self, x: torch.Tensor) -> bool:
        """Whether `route` takes `router_topk` for x (false for larger batches once false for x)."""
        r, gate = self.routing, self.gate
        # The kernel's logits dtype is promote(x, weight): an fp32 router needs its fp32 weight to match.
        same_logits = not gate.fp32 or gate.weight.dtype == torch.float32
        return same_logits and not gate.observed and fused_router_applies(
            x, gate.weight, r.top_k, scoring=r.scoring, topk_method=r.topk_method,
            correction_bias=gate.e_score_correction_bias,
        )

    def select(
        self, router_logits: torch.Tensor, num_real_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits: [T, E] (any float dtype) -> (topk_weights [T, k] float32, topk_ids [T, k] int32,
        logical ids); rows at and beyond num_real_tokens ([1] int32, device) choose no expert."""
        r = self.routing
        return select_experts(
            router_logits,
            r.top_k,
            scoring=r.scoring,
            renormalize=r.renormalize,
            topk_method=r.topk_method,
            n_group=r.n_group,
            topk_group=r.topk_group,
            correction_bias=self.gate.e_score_correction_bias,
            routed_scaling_factor=r.routed_scaling_factor,
            num_real_tokens=num_real_tokens,
        )

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_name is None:
            return None
        y = getattr(self, self.shared_name)(x)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y

    def _record_load(self, phys: torch.Tensor, batch: ForwardBatch) -> None:
        """When the runner asks (batch.extras["expert_load"]: [num_moe_layers, num_physical] int64), add this
        step's tokens per physical expert to this layer's row."""
        load = batch.extras.get("expert_load")
        if load is not None and phys.numel():
            # Shift by one so that -1 ("no expert") lands in bin 0, which is dropped. scatter_add_ rather than
            # bincount: CUDA's bincount reads the max id on the host (a sync, and not graph-capturable).
            idx = phys.flatten().long() + 1
            counts = torch.zeros(load.shape[1] + 1, dtype=load.dtype, device=load.device)
            counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=load.dtype))
            load[self.layer_idx].add_(counts[1:])

    def set_local_experts(self, experts: list[int]) -> None:
        """Which logical expert each local slot holds (at load time, and after an EPLB weight move)."""
        self.local_experts = list(experts)
        self.slots_of: dict[int, list[int]] = {}
        for slot, expert in enumerate(self.local_experts):
            self.slots_of.setdefault(expert, []).append(slot)

    # ---- weight loading (called by the model's load_weights) ----

    def holds_expert(self, expert: int) -> bool:
        return expert in self.slots_of

    def expert_weight_names(self, prefix: str) -> list[str]:
        """Checkpoint names of the experts this rank holds, e.g. ``{prefix}.experts.3.gate_proj.weight``."""
        return [
            f"{prefix}.experts.{e}.{p}.weight" for e in sorted(self.slots_of) for p in self.expert_proj_names
        ]

    def expert_weight_shape(self, proj: str) -> tuple[int, int]:
        """[out, in] of one expert's projection, as the checkpoint stores it."""
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if proj == self.expert_proj_names[2] else (i, h)

    @torch.no_grad()
    def load_expert(self, expert: int, proj: str, weight: torch.Tensor) -> None:
        """Copy one checkpoint tensor (gate/up: [I, H], down: [H, I]) into each local slot of `expert`."""
        gate, up, down = self.expert_proj_names
        i = self.intermediate_size
        for slot in self.slots_of[expert]:
            if proj == gate:
                self.w13[slot, :i].copy_(weight)
            elif proj == up:
                self.w13[slot, i:].copy_(weight)
            elif proj == down:
                self.w2[slot].copy_(weight)
            else:
                raise KeyError(
                    f"unknown expert projection {proj!r}; expected one of {self.expert_proj_names}"
                )
