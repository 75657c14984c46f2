"""Triton kernels, each with a pure-torch reference. Imports torch and triton only."""
