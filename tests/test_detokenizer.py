"""Incremental detokenisation: streamed text equals a one-shot decode, cut at the first stop string."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.testing.byte_tokenizer import BYTE_VOCAB_SIZE, NUM_BYTES, write_byte_tokenizer
from moeserve.tokenizer import Tokenizer

# 1-, 2-, 3- and 4-byte characters, so byte tokens often end mid-character.
ALPHABET = ["a", "b", " ", "\n", "é", "ß", "世", "界", "€", "🎉", "👍", "x"]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("byte_tok")
    write_byte_tokenizer(path)
    return Tokenizer.from_pretrained(path)


class DecodeOnly:
    """A tokenizer seen only through ``decode``: the detokenizer must take its generic (window) path."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(params=["byte_stream", "window_stream"])
def any_tok(request: pytest.FixtureRequest, byte_tok: Tokenizer):
    """The byte tokenizer, through the byte-level fast path or through decode alone."""
    return byte_tok if request.param == "byte_stream" else DecodeOnly(byte_tok)


def llama_style_tokenizer() -> Tokenizer:
    """SentencePiece-like BPE with byte fallback and a decoder that strips the first leading space.

    Decoding a window alone differs from decoding it in context (the Strip), which is what the prefix-offset
    technique must get right; characters outside the vocabulary fall back to one token per byte.
    """
    pieces = ["▁", *"abehlotwr", "▁t", "he", "▁the", "ll", "llo", "▁h", "▁he", "▁hello", "▁w", "or", "▁wor"]
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({p: 256 + i for i, p in enumerate(pieces)})
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("l", "l"), ("ll", "o"), ("▁", "h"), ("▁h", "e"),
              ("▁he", "llo"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(backend)


def random_ids(rng: random.Random, n_chars: int, noise: bool) -> list[int]:
    """Bytes of random text; with noise, also special tokens and stray bytes that are not valid UTF-8."""
    ids: list[int] = []
    for _ in range(n_chars):
        ids.extend(rng.choice(ALPHABET).encode())
        if noise and rng.random() < 0.08:
            ids.append(rng.randrange(NUM_BYTES, BYTE_VOCAB_SIZE))  # a special token
        if noise and rng.random() < 0.04:
            ids.append(rng.choice([0x80, 0xBF, 0xE4, 0xF0, 0xFF]))  # continuation/lead byte out of place
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random, final_text: str) -> str:
    """Feed ids in random chunks; check that what was emitted is never retracted; return all emitted text."""
    out, i = "", 0
    while i < len(ids) and not detok.finished:
        n = rng.randint(0, 5)
        out += detok.update(ids[i : i + n]).text
        i += n
        assert final_text.startswith(out), "emitted text was later retracted"
        assert detok.output_text == out
    out += detok.flush()
    assert detok.output_text == out
    return out


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: the occurrence of a stop string that ends first (earliest start on a tie)."""
    hits = [(i + len(s), i, s) for s in stops if (i := text.find(s)) >= 0]
    return None if not hits else min(hits)[1:]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_equals_one_shot_decode(
    byte_tok: Tokenizer, any_tok, seed: int, skip_special_tokens: bool
) -> None:
    rng = random.Random(seed)
    ids = random_ids(rng, rng.randint(0, 60), noise=True)
    reference = byte_tok.decode(ids, skip_special_tokens=skip_special_tokens)
    detok = IncrementalDetokenizer(any_tok, skip_special_tokens=skip_special_tokens)
    assert stream(detok, ids, rng, reference) == reference
    assert detok.stop_reason is None


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_cut_at_first_occurrence(
    byte_tok: Tokenizer, any_tok, seed: int, include_stop: bool
) -> None:
    rng = random.Random(100 + seed)
    ids = random_ids(rng, rng.randint(5, 60), noise=seed % 3 == 0)
    full = byte_tok.decode(ids)
    stops = ["".join(rng.choices(ALPHABET, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    if seed % 2 == 0 and full:  # make sure that half the cases do stop, somewhere in the middle
        start = rng.randrange(len(full))
        stops.append(full[start : start + rng.randint(1, 3)])
    hit = first_stop(full, stops)
    if hit is None:
        expected, expected_stop = full, None
    else:
        start, expected_stop = hit
        expected = full[: start + len(expected_stop)] if include_stop else full[:start]
    detok = IncrementalDetokenizer(any_tok, stop=stops, include_stop_str_in_output=include_stop)
    assert stream(detok, ids, rng, expected) == expected
    assert detok.stop_reason == expected_stop
    assert detok.finished


def test_hold_back_and_stop_across_updates(any_tok) -> None:
    detok = IncrementalDetokenizer(any_tok, stop=["世界!", "zz"])
    assert detok.update(list(b"hi \xe4")).text == ""  # the newest character is incomplete: hold it all
    assert detok.update(list(b"\xb8\x96")).text == "hi"  # "hi 世": the last 2 chars may start "世界!"
    assert detok.update(list("界".encode())).text == " "
    update = detok.update(list(b"!tail"))
    assert update.text == "" and update.stop == "世界!"
    assert detok.output_text == "hi "
    assert detok.update(list(b"more")).text == "" and detok.flush() == ""


def test_longer_stop_that_starts_earlier_loses_to_one_that_ends_first(any_tok) -> None:
    ids = list(b"xabcd")
    for chunks in ([ids], [[i] for i in ids]):
        detok = IncrementalDetokenizer(any_tok, stop=["abcd", "bc"])
        text = "".join(detok.update(c).text for c in chunks)
        assert (text, detok.stop_reason) == ("xa", "bc")


def test_flush_emits_incomplete_character(byte_tok: Tokenizer, any_tok) -> None:
    ids = list(b"ok\xf0\x9f")  # the first half of an emoji
    detok = IncrementalDetokenizer(any_tok)
    assert detok.update(ids).text == ""  # text ending in U+FFFD is held back
    assert detok.flush() == byte_tok.decode(ids) == "ok\ufffd"


class CountingDecoder:
    """Records how many tokens each decode call sees."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.window_sizes = tok, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_only_a_window_of_recent_tokens(byte_tok: Tokenizer) -> None:
    rng = random.Random(7)
    ids = random_ids(rng, 1500, noise=False)
    counter = CountingDecoder(byte_tok)
    detok = IncrementalDetokenizer(counter, stop=["zzz"])
    text = "".join(detok.update([i]).text for i in ids) + detok.flush()
    assert text == byte_tok.decode(ids)
    # The window is the previous read (<= 4 byte tokens of one character) plus the one being completed.
    assert max(counter.window_sizes) <= 8
    assert sum(counter.window_sizes) <= 8 * len(ids)


@pytest.mark.parametrize("seed", range(6))
def test_context_dependent_decoder(seed: int) -> None:
    tok = llama_style_tokenizer()
    rng = random.Random(seed)
    words = ["the", "hello", "world", "wow", "🎉", "世界", "é", "a"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    assert stream(detok, ids, rng, text) == text
    # With the prompt as context, the first generated token keeps the space the decoder strips at the start.
    split = rng.randint(1, len(ids) - 1)
    prompt, generated = ids[:split], ids[split:]
    if not tok.decode(prompt).endswith("\ufffd"):
        expected = text[len(tok.decode(prompt)) :]
        detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
        assert stream(detok, generated, rng, expected) == expected


def test_rejects_empty_stop_string(byte_tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(byte_tok, stop=["ok", ""])


def test_works_with_transformers_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_byte_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = list("héllo 🎉 世界".encode())
    detok = IncrementalDetokenizer(hf, stop=["界"])
    text = "".join(detok.update([i]).text for i in ids)
    assert text == "héllo 🎉 世" and detok.stop_reason == "界"


# ---- the byte-level fast path against one-shot decoding ------------------------------------------------------

BPE_SPECIAL = ["<|end|>", "<｜User｜>"]  # the second has characters outside the byte alphabet
# Not special: never skipped. "ÿ" is the alphabet's byte 0xFF; " " and "€" are outside the alphabet.
BPE_ADDED = ["ÿ€", "<tool>", "a b"]


def trained_byte_level_bpe() -> HFTokenizer:
    """A GPT-2 style byte-level BPE trained here on random multilingual text, so that merged tokens span
    character boundaries, plus special and plain added tokens."""
    from tokenizers import AddedToken, trainers

    rng = random.Random(0)
    corpus = ["".join(rng.choices(ALPHABET + ["ab", "世界", "the "], k=40)) for _ in range(300)]
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BPE_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in BPE_ADDED])
    return backend


def random_bpe_ids(rng: random.Random, size: int, n: int) -> list[int]:
    """Uniform random ids (any byte-level token may follow any other), plus a few unknown ids."""
    return [rng.randrange(size + 3) if rng.random() < 0.97 else size + rng.randrange(5) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_backend() -> HFTokenizer:
    return trained_byte_level_bpe()


@pytest.fixture(scope="module")
def bpe_tok(bpe_backend: HFTokenizer) -> Tokenizer:
    return Tokenizer(bpe_backend, special_tokens={"eos_token": "<|end|>"})


def test_token_bytes_only_for_byte_level_decoders(byte_tok: Tokenizer, bpe_tok: Tokenizer) -> None:
    table = byte_tok.token_bytes(skip_special_tokens=False)
    assert table[: NUM_BYTES] == [bytes([b]) for b in range(NUM_BYTES)]
    assert byte_tok.token_bytes(skip_special_tokens=True)[NUM_BYTES:] == [b""] * (BYTE_VOCAB_SIZE - NUM_BYTES)
    assert len(bpe_tok.token_bytes()) == bpe_tok.vocab_size
    assert max(len(b) for b in bpe_tok.token_bytes()) > 4  # real merges: tokens longer than a character
    assert llama_style_tokenizer().token_bytes() is None


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_stream_matches_one_shot_decode_of_trained_bpe(
    bpe_tok: Tokenizer, seed: int, skip_special_tokens: bool
) -> None:
    rng = random.Random(200 + seed)
    ids = random_bpe_ids(rng, bpe_tok.vocab_size, rng.randint(1, 300))
    reference = bpe_tok.decode(ids, skip_special_tokens=skip_special_tokens)
    counter = CountingDecoder(bpe_tok)
    counter.token_bytes = bpe_tok.token_bytes  # the fast path, observed
    detok = IncrementalDetokenizer(
        counter, skip_special_tokens=skip_special_tokens, prompt_token_ids=ids[:7]
    )
    assert stream(detok, ids, rng, reference) == reference
    assert counter.window_sizes == []  # nothing was decoded through the tokenizer


def test_byte_stream_matches_transformers_decode(bpe_backend: HFTokenizer, bpe_tok: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_backend, clean_up_tokenization_spaces=False)
    rng = random.Random(5)
    for _ in range(20):
        ids = random_bpe_ids(rng, bpe_tok.vocab_size, rng.randint(1, 120))
        for skip in (True, False):
            reference = hf.decode(ids, skip_special_tokens=skip)
            stops = ["".join(rng.choices(ALPHABET, k=2))]
            hit = first_stop(reference, stops)
            expected = reference if hit is None else reference[: hit[0]]
            detok = IncrementalDetokenizer(bpe_tok, skip_special_tokens=skip, stop=stops)
            assert stream(detok, ids, rng, expected) == expected
