"""Attention over the paged KV cache: one small interface, several backends (torch reference, Triton, ...)."""

from moeserve.attention.base import AttentionBackend, create_attention_backend

__all__ = ["AttentionBackend", "create_attention_backend"]
