"""Incremental detokenization and stop-string hold-back."""

from __future__ import annotations

import pytest
from fake_runner import tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from athena_runtime.stop_strings import IncrementalDetokenizer, StopStringMatcher, TextStream
from athena_runtime.token_decoder import TokenDecoder

TEXT = "Caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f600 Hello world!"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def decode(tok):
    return TokenDecoder(tok).decode


def test_multibyte_characters_stream_whole_and_match_a_full_decode(tok, decode):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # characters really span several tokens
    prompt = tok.encode("Hello there,")
    detok = IncrementalDetokenizer(decode, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == TEXT == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 0  # some tokens had to wait for the next


def test_leading_space_of_the_first_token_survives(tok, decode):
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(decode, ids[:1])
    assert "".join(detok.add(t) for t in ids[1:]) == " world"


def test_incomplete_character_at_the_end_is_flushed(tok, decode):
    ids = tok.encode("\U0001f600")
    detok = IncrementalDetokenizer(decode, [])
    assert "".join(detok.add(t) for t in ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


def feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    emitted = []
    for piece in pieces:
        out, hit = matcher.add(piece)
        emitted.append(out)
        if hit:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_stop_string_split_across_pieces_is_never_emitted():
    emitted, hit = feed(StopStringMatcher(("STOP",)), ["Hel", "lo S", "TO", "P there"])
    assert hit and emitted == ["Hel", "lo ", "", ""]
    emitted, hit = feed(StopStringMatcher(("STOP",)), ["Hel", "lo S", "TO", "ry"])
    assert not hit and emitted == ["Hel", "lo ", "", "STOry", ""]  # held back, then released whole


def test_earliest_stop_string_wins_and_text_after_it_is_dropped():
    emitted, hit = feed(StopStringMatcher(("world", "lo w")), ["Hello world and more"])
    assert hit and "".join(emitted) == "Hel"


def reference(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    """Stop at the first piece after which some stop string occurs; cut at its earliest start."""
    text = ""
    for piece in pieces:
        text += piece
        found = [text.find(s) for s in stops if s and s in text]
        if found:
            return text[: min(found)], True
    return text, False


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("abc", max_size=4), max_size=12), st.lists(st.text("abc", min_size=1, max_size=4), max_size=3))
def test_hold_back_matches_reference_and_never_retracts(pieces, stops):
    stops = tuple(stops)
    final, should_hit = reference(pieces, stops)
    emitted, hit = feed(StopStringMatcher(stops), pieces)
    assert hit == should_hit
    assert "".join(emitted) == final  # only ever appended: nothing retracted


def test_text_stream_with_a_stop_string_spanning_tokens(tok, decode):
    ids = tok.encode("Hello world! Hello there, how are you today?")
    stream = TextStream(decode, tok.encode("Say:"), stops=("lo th",))
    out = []
    for t in ids:
        text, hit = stream.add(t)
        out.append(text)
        if hit:
            break
    assert hit and "".join(out) == "Hello world! Hel"
    assert all("lo th" not in "".join(out[: i + 1]) for i in range(len(out)))


def test_text_stream_flush_releases_held_back_text(tok, decode):
    ids = tok.encode("Caf\u00e9 na")
    stream = TextStream(decode, [], stops=("na\u00efve",))
    text = "".join(stream.add(t)[0] for t in ids)
    assert text == "Caf\u00e9 " and stream.flush() == "na"
