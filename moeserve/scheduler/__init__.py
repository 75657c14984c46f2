"""Scheduling: one token budget per step over a paged KV cache with a radix prefix cache."""
