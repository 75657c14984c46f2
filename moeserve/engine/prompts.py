"""Prompt checks shared by every front end (offline LLM, Ray workers, HTTP): tokenize, then refuse what cannot
run, saying what was wrong and what is allowed."""

from __future__ import annotations

from moeserve.tokenizer import Tokenizer


class PromptChecker:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def __call__(self, prompt: str | list[int]) -> list[int]:
        """Text or token ids -> token ids that fit the model; raises ValueError otherwise."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; a prompt needs at least one token")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty; a prompt needs at least one token")
            bad = [
                t
                for t in ids
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size
            ]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}"
                )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context limit is {self.max_model_len} "
                "(max_model_len), which must also leave room for at least one generated token"
            )
        return ids
