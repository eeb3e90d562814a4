"""llama.cpp's DRY and XTC samplers: DRY lowers tokens that would extend a repeat of an earlier passage, XTC leaves
out the likeliest choices. The sampler alone against a plain rewrite of the rule, then on models through every door
(Python, /v1, the page, a remote upstream), across cache reuse and a continued answer."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from test_sampling import ASK, GREEDY, params, steps

import app
from llm_backends.openai_api import chat_request
from llm_backends.request import DRY_SEQUENCE_BREAKERS, build_request
from llm_backends.sampling import Repeats, Sampler, _max_excess

DRY = {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1}


def dry_by_hand(context, multiplier, base, allowed, last_n, breakers) -> dict[int, float]:
    """The rule written out plainly (text-generation-webui's loops): each earlier place of the last token whose
    next token is no breaker, the repeat grown backwards while both sides agree and are no breakers."""
    context = context[-last_n:] if last_n > 0 else context
    if len(context) < 2 or context[-1] in breakers:
        return {}
    longest: dict[int, int] = {}
    excess = _max_excess(base)  # past this the penalty grows no more
    for i in range(len(context) - 1):
        if context[i] != context[-1] or context[i + 1] in breakers:
            continue
        n = 1
        while n < allowed + excess and i - n >= 0:
            if context[i - n] != context[-1 - n] or context[i - n] in breakers:
                break
            n += 1
        if n >= allowed:
            longest[context[i + 1]] = max(longest.get(context[i + 1], 0), n)
    return {t: multiplier * base ** min(n - allowed, excess) for t, n in longest.items()}


@pytest.mark.parametrize("seed", range(40))
def test_dry_lowers_each_token_that_extends_a_repeat_by_the_rule(seed):
    rng = random.Random(seed)
    vocabulary = rng.randint(2, 6)
    context = [rng.randrange(vocabulary) for _ in range(rng.randint(2, 120))]
    if rng.random() < 0.5:  # long copies of earlier stretches, as a looping model writes
        start = rng.randrange(len(context))
        context += context[start : start + rng.randint(1, 60)]
    allowed, last_n = rng.randint(1, 4), rng.choice([-1, 5, 40])
    breakers = {0} if rng.random() < 0.5 else set()
    sampling = params(**DRY, dry_sequence_breakers=("\n",))
    sampling = replace(sampling, dry_allowed_length=allowed, dry_penalty_last_n=last_n)
    found = Repeats(sampling, context, lambda t: "\n" if t in breakers else "w").penalties()
    got = {} if found is None else {int(t): float(v) for t, v in zip(*found, strict=True)}
    want = dry_by_hand(context, 0.8, 1.75, allowed, last_n, breakers)
    assert got.keys() == want.keys()
    for token, amount in want.items():
        assert math.isclose(got[token], amount, rel_tol=1e-6)


def test_a_reply_growing_token_by_token_is_seen_as_the_whole_context():
    text = {9: "\n"}
    grown = Repeats(params(**DRY, dry_sequence_breakers=("\n",)), [1, 2, 3, 9], lambda t: text.get(t, "w"))
    for token in (1, 2):
        grown.add(token)
    whole = Repeats(params(**DRY, dry_sequence_breakers=("\n",)), [1, 2, 3, 9, 1, 2], lambda t: text.get(t, "w"))
    assert [a.tolist() for a in grown.penalties()] == [a.tolist() for a in whole.penalties()]
    assert grown.penalties()[0].tolist() == [3] and math.isclose(grown.penalties()[1][0], 0.8, rel_tol=1e-6)


def test_dry_at_greedy_turns_away_from_a_repeat_and_a_breaker_ends_it():
    logits = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.5, 0.0])  # token 3 continues "1 2 | 3"

    def words(token):
        return "\n" if token == 5 else "w"

    newline = params(**DRY, dry_sequence_breakers=("\n",))
    sampler = Sampler(newline, "cpu", [1, 2, 3, 4, 1, 2], token_text=words)
    assert not sampler.plain_greedy
    assert sampler.pick(logits) == 4  # 2.0 - 0.8 < 1.5
    sampler.said(4)
    sampler.said(5)  # a newline: nothing after it extends a repeat
    assert sampler.pick(logits) == 3
    # A breaker inside the earlier passage cuts the repeat to "2" alone, shorter than the allowed 2.
    assert Sampler(newline, "cpu", [1, 5, 2, 3, 4, 1, 5, 2], token_text=words).pick(logits) == 3
    assert Sampler(newline, "cpu", [1, 5, 2, 3, 4, 1, 5, 2], token_text=lambda t: "w").pick(logits) == 4
    off = Sampler(params(**{**DRY, "dry_multiplier": 0.0}), "cpu", [1, 2, 3, 4, 1, 2], token_text=words)
    assert off.plain_greedy and off.pick(logits) == 3
    # The penalty stays finite however long the loop: a token it lowers can still be the only one allowed.
    loop = Sampler(params(**DRY, temperature=1.0, seed=1), "cpu", [7] * 5000, token_text=words)
    assert loop.pick(torch.tensor([float("-inf")] * 7 + [0.0])) == 7


def test_a_breaker_spelled_over_several_tokens_ends_repeats_like_a_one_token_breaker():
    pieces = {10: " Ser", 11: "aph", 12: "ina"}
    name = params(**DRY, dry_sequence_breakers=(" Seraphina",))
    context = [10, 11, 12, 1, 2, 3, 4, 10, 11, 12, 1, 2]
    broken = Repeats(name, context, lambda t: pieces.get(t, "w")).penalties()
    assert broken[0].tolist() == [3] and math.isclose(float(broken[1][0]), 0.8, rel_tol=1e-6)  # "1 2" only
    whole = Repeats(params(**DRY, dry_sequence_breakers=("\n",)), context, lambda t: pieces.get(t, "w")).penalties()
    assert math.isclose(float(whole[1][0]), 0.8 * 1.75**3, rel_tol=1e-6)  # "Ser aph ina 1 2"
    # The name's first piece is a breaker too: nothing that would start it again is lowered.
    assert Repeats(name, [1, 2, 10, 11, 12, 5, 1, 2], lambda t: pieces.get(t, "w")).penalties() is None


def test_xtc_cuts_only_choices_still_kept_and_judges_them_before_the_temperature():
    xtc = {"temperature": 1.0, "top_k": None, "xtc_probability": 1.0, "xtc_threshold": 0.0}
    masked = torch.tensor([float("-inf"), float("-inf"), 0.0, 0.0, float("-inf")])  # a grammar allows 2 and 3
    assert {Sampler(params(**xtc, seed=s), "cpu").pick(masked) for s in range(50)} <= {2, 3}
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]))
    assert {Sampler(params(**xtc, top_p=0.4, seed=s), "cpu").pick(logits) for s in range(50)} == {0}
    # At temperature 2 the shares are judged as at 1 (llama.cpp's order): only token 0 is cut.
    hot = {**xtc, "temperature": 2.0, "xtc_threshold": 0.1}
    skewed = torch.log(torch.tensor([0.6, 0.25, 0.08, 0.07]))
    assert {Sampler(params(**hot, seed=s), "cpu").pick(skewed) for s in range(300)} == {1, 2, 3}


def test_xtc_draws_its_chance_apart_so_a_threshold_that_cuts_nothing_keeps_a_seeded_reply():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3

    def draws(**fields):
        sampler = Sampler(params(temperature=1.0, top_k=None, seed=3, **fields), "cpu")
        return [sampler.pick(logits) for _ in range(40)]

    assert draws(xtc_probability=1.0, xtc_threshold=0.9) == draws()
    assert draws(xtc_probability=0.5, xtc_threshold=0.05) == draws(xtc_probability=0.5, xtc_threshold=0.05)


def test_xtc_leaves_out_all_likely_choices_but_the_least_likely_of_them():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]))
    xtc = {"temperature": 1.0, "top_k": None, "xtc_probability": 1.0, "xtc_threshold": 0.1}
    picks = {Sampler(params(**xtc, seed=s), "cpu").pick(logits) for s in range(300)}
    assert picks == {2, 3, 4}
    picks = {Sampler(params(**{**xtc, "xtc_threshold": 0.4}), "cpu").pick(logits) for _ in range(200)}
    assert 0 in picks and 1 in picks  # one choice above the threshold: nothing is left out
    picks = {Sampler(params(**{**xtc, "xtc_probability": 0.0}), "cpu").pick(logits) for _ in range(300)}
    assert {0, 1} <= picks
    assert Sampler(params(xtc_probability=1.0, xtc_threshold=0.1), "cpu").pick(logits) == 0  # greedy is greedy


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"dry_multiplier": -1}, "dry_multiplier must be in"),
        ({"dry_base": 0.5}, "dry_base must be in"),
        ({"dry_allowed_length": 0}, "dry_allowed_length must be between"),
        ({"dry_allowed_length": 65}, "dry_allowed_length must be between 1 and 64"),
        ({"dry_penalty_last_n": -2}, "dry_penalty_last_n must be between"),
        ({"dry_sequence_breakers": "\n"}, "must be a non-empty list of strings"),
        ({"dry_sequence_breakers": []}, "must be a non-empty list of strings"),
        ({"dry_sequence_breakers": ["\n", ""]}, "1 to 32 characters"),
        ({"dry_sequence_breakers": ["x"] * 33}, "at most 32"),
        ({"xtc_probability": 1.5}, "xtc_probability must be in"),
        ({"xtc_threshold": "high"}, "xtc_threshold must be a number"),
    ],
)
def test_bad_dry_and_xtc_settings_are_refused_by_name(fields, needle):
    with pytest.raises(ValueError, match=needle):
        build_request(ASK, family=None, context_length=None, **fields)


def test_a_local_model_fills_llama_cpps_defaults_and_a_remote_one_sends_only_what_was_set(qwen3):
    sampling = chat_request(qwen3, {"messages": ASK, "dry_multiplier": 0.8, "xtc_probability": 0.5}).sampling
    assert (sampling.dry_multiplier, sampling.dry_base, sampling.dry_allowed_length) == (0.8, 1.75, 2)
    assert (sampling.dry_penalty_last_n, sampling.dry_sequence_breakers) == (-1, DRY_SEQUENCE_BREAKERS)
    assert (sampling.xtc_probability, sampling.xtc_threshold) == (0.5, 0.1)
    # A window past the context is the whole context (llama.cpp's reading; SillyTavern sends large ones).
    assert chat_request(qwen3, {"messages": ASK, "dry_penalty_last_n": 10**6}).sampling.dry_penalty_last_n == 10**6
    remote = build_request(ASK, family=None, context_length=None, dry_multiplier=0.8).sampling
    assert (remote.dry_multiplier, remote.dry_base, remote.dry_sequence_breakers, remote.xtc_threshold) == (
        0.8,
        None,
        None,
        None,
    )


def repeats(ids: list[int], n: int = 3) -> int:
    """How many of the reply's n-grams stood earlier in it."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.embedded
def test_dry_on_the_embedded_model_picks_the_best_penalised_token_and_loops_less(embedded):
    """Greedy with DRY: each pick is the argmax of the model's own log-probabilities after DRY's penalties over
    the prompt and the reply so far (the plain rewrite above); the base model's plain greedy reply loops, this
    one far less; the same request again, from the cache, gives the same reply."""
    prompt_ids, _ = embedded.fit(embedded.request(ASK, thinking=False))
    plain, _ = steps(embedded, 80)
    ids, tops = steps(embedded, 80, **DRY)
    text = embedded.engine.token_text
    breakers = {t for t in set(prompt_ids) | set(ids) if any(b in text(t) for b in DRY_SEQUENCE_BREAKERS)}
    for i, (token, top) in enumerate(zip(ids, tops, strict=True)):
        lowered = dry_by_hand(prompt_ids + ids[:i], 0.8, 1.75, 2, -1, breakers)

        def penalised(t, top=top, lowered=lowered):
            return top[t] - lowered.get(t, 0.0)

        assert token in top
        assert math.isclose(penalised(token), max(map(penalised, top)), abs_tol=1e-4), i
    assert repeats(plain) > 20 and repeats(ids) < repeats(plain) / 2, (repeats(plain), repeats(ids))
    fields = {**DRY, "temperature": 0, "max_tokens": 40, "user": "dry-again"}
    texts = {embedded.create(ASK, **fields)["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(texts) == 1


def test_a_continued_answer_with_dry_reads_the_answer_as_context(qwen3):
    fields = {**DRY, "dry_allowed_length": 1, **GREEDY}
    whole = qwen3.create(ASK, max_tokens=24, **fields)["choices"][0]["message"]["content"]
    start = qwen3.create(ASK, max_tokens=9, user="dry-cut", **fields)["choices"][0]["message"]["content"]
    more = qwen3.create(
        [*ASK, {"role": "assistant", "content": start}],
        max_tokens=15,
        user="dry-cut",
        continue_final_message=True,
        **fields,
    )["choices"][0]["message"]["content"]
    assert start + more == whole
    assert whole != qwen3.create(ASK, max_tokens=24, **GREEDY)["choices"][0]["message"]["content"]


@pytest.mark.embedded
def test_xtc_on_the_embedded_model_never_draws_a_choice_it_leaves_out(embedded):
    """At temperature 1 with XTC always on: no drawn token is one of the step's likely choices (probability at
    least 0.1 under the model) other than the least likely of them, where there were two or more."""
    ids, tops = steps(embedded, 60, temperature=1.0, top_p=1.0, top_k=0, xtc_probability=1.0, seed=4)
    left_out = 0
    for token, top in zip(ids, tops, strict=True):
        likely = sorted((t for t, lp in top.items() if lp >= math.log(0.1)), key=top.get)
        if len(likely) >= 2:
            assert token not in likely[1:]
            left_out += 1
    assert left_out >= 5
    # The same seed without XTC does draw such choices.
    ids, tops = steps(embedded, 60, temperature=1.0, top_p=1.0, top_k=0, seed=4)
    assert any(
        t in sorted((x for x, lp in top.items() if lp >= math.log(0.1)), key=top.get)[1:]
        for t, top in zip(ids, tops, strict=True)
    )


def test_the_pages_dry_and_xtc_controls_reach_the_request_and_at_their_defaults_are_left_unset(qwen3):
    base = dict(system_prompt="", temperature=0, top_p=1, top_k=0, max_new_tokens=16, repetition_penalty=1, seed=-1)
    plain = app.ChatSettings(**base, thinking=False).request(qwen3, ASK, None).sampling
    assert (plain.dry_multiplier, plain.xtc_probability, plain.xtc_threshold) == (None, None, 0.1)
    settings = app.ChatSettings(**base, thinking=False, dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.2)
    sampling = settings.request(qwen3, ASK, None).sampling
    assert (sampling.dry_multiplier, sampling.xtc_probability, sampling.xtc_threshold) == (0.8, 0.5, 0.2)
