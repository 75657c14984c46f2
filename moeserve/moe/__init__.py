"""The MoE layer's moving parts: routing, placement, dispatch/combine and the expert kernels."""
