"""The random checkpoints' stand-in tokenizer covers the model's whole vocabulary: every id a random
model samples decodes to text, so a streaming server sends one chunk per token (with ids that decode to
nothing it sent one every ~4 tokens and its inter-token latency read ~4x the time per token)."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from athena_runtime.token_decoder import TokenDecoder
from bench.random_checkpoint import _tokenizer


def test_every_id_decodes_to_text_and_encoding_uses_trained_tokens(tmp_path):
    vocab = 9000  # over the 8000 ids the BPE trains
    _tokenizer(tmp_path, vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == vocab
    special = set(tok.all_special_ids)
    texts = [tok.decode([i]) for i in range(vocab)]
    assert all(text for i, text in enumerate(texts) if i not in special)
    assert len(set(texts[8000:])) == vocab - 8000  # fillers are distinct words
    ids = tok.encode("The with statement is used to wrap the execution of a block.", add_special_tokens=False)
    assert ids and max(ids) < 8000  # no merge makes a filler token
    decoder = TokenDecoder(tok)
    assert decoder.kind == "byte table"
    rng = random.Random(0)
    seq = [rng.randrange(3, vocab) for _ in range(50)]
    assert decoder.decode(seq) == tok.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_open_checkpoint_builds_once_and_rewrites_a_short_tokenizer(tmp_path, caplog):
    """bench.random_checkpoint.open_checkpoint: the family's folder, written when missing and reused after; a stand-in
    tokenizer with fewer ids than the vocabulary (an old checkpoint's) is rewritten with a WARNING."""
    import logging

    from bench.random_checkpoint import checkpoint, open_checkpoint

    folder, tok, vocab = open_checkpoint(tmp_path, "tiny-llama")
    assert folder == tmp_path / "tiny-llama-athena" and len(tok) == vocab
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert checkpoint(tmp_path, "tiny-llama") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # not rebuilt
    _tokenizer(folder, vocab - 5)  # as a checkpoint from before the tokenizer covered the vocabulary
    with caplog.at_level(logging.WARNING, logger="bench.random_checkpoint"):
        _, tok, _ = open_checkpoint(tmp_path, "tiny-llama")
    assert len(tok) == vocab and "rewriting it" in caplog.text
