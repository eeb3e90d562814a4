"""Ids -> text: UTF-8 safe deltas, stop strings held back, reasoning routed by the think tags."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from llm_backends.text_stream import IncrementalDecoder, ReplyText, StopStrings


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(qwen3_dir))


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per byte, so multi-byte characters arrive in pieces."""
    from tokenizers.pre_tokenizers import ByteLevel

    return tokenizer.convert_tokens_to_ids(
        [ch for ch, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(text) for ch in ch]
    )


def test_decoder_never_emits_half_a_multibyte_character(tokenizer):
    text = "你好，世界 😀 café"
    ids = byte_tokens(tokenizer, text)
    assert len(ids) == len(text.encode())
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5, "text arrives in several steps"


def test_decoder_matches_whole_decode_on_normal_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. 中文是一等公民。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


def test_flush_drops_an_incomplete_trailing_character(tokenizer):
    ids = byte_tokens(tokenizer, "ab你")[:-1]
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "ab"


@pytest.mark.parametrize(
    "pieces, stops, expected",
    [
        (["Hello ", "wor", "ld. END", " more"], ["END"], "Hello world. "),
        (["abc", "<", "/s", "> tail"], ["</s>"], "abc"),
        (["a<", "b"], ["<x>"], "a<b"),
        (["no stop here"], [], "no stop here"),
    ],
)
def test_stop_strings_cut_and_hold_back(pieces, stops, expected):
    stop = StopStrings(stops)
    out = "".join(stop.push(p) for p in pieces) + stop.flush()
    assert out == expected
    assert stop.hit == any(s in "".join(pieces) for s in stops)


def test_stop_string_prefix_is_held_until_resolved():
    stop = StopStrings(["STOP"])
    assert stop.push("go ST") == "go "
    assert stop.push("OP!") == ""
    assert stop.hit


def route(tokenizer, text_pieces: list[str], thinking: bool) -> tuple[str, str]:
    think_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    reply = ReplyText(tokenizer, think_ids=think_ids, thinking=thinking, stop=())
    answer, reasoning = [], []
    for piece in text_pieces:
        for token in tokenizer(piece, add_special_tokens=False)["input_ids"]:
            a, r = reply.push(token)
            answer.append(a)
            reasoning.append(r)
    a, r = reply.flush()
    return "".join(answer) + a, "".join(reasoning) + r


def test_thinking_is_split_from_the_answer(tokenizer):
    answer, reasoning = route(tokenizer, ["<think>", "\nLet me think.\n", "</think>", "\n\nParis."], True)
    assert (answer, reasoning) == ("Paris.", "Let me think.\n")


def test_thinking_without_the_opening_tag_is_still_reasoning(tokenizer):
    answer, reasoning = route(tokenizer, ["Let me think.", "</think>", "\n\nParis."], True)
    assert (answer, reasoning) == ("Paris.", "Let me think.")


def test_thinking_off_drops_an_empty_think_block(tokenizer):
    answer, reasoning = route(tokenizer, ["<think>", "\n\n", "</think>", "\n\nParis."], False)
    assert (answer, reasoning) == ("Paris.", "")


@pytest.mark.parametrize(
    "before, pieces, shown, hit",
    [
        ("4\n", ["Quest", "ion:", " more"], "", True),  # begun in what was shown, ended in the new text
        ("4\nQues", ["tion: x"], "", True),
        ("4", ["\nQuestion:"], "", True),
        ("Question: 4", [" and 5"], " and 5", False),  # wholly in what was shown: not the new text's
        ("4\n", ["Quiet"], "Quiet", False),
    ],
)
def test_a_stop_string_may_begin_in_the_text_shown_before(before, pieces, shown, hit):
    stop = StopStrings(["\nQuestion:"], before)
    out = "".join(stop.push(piece) for piece in pieces) + stop.flush()
    assert (out, stop.hit) == (shown, hit)
