"""The sampling settings the peers offer beyond temperature and top-p/k: ``min_p``, OpenAI's ``presence_penalty``,
``frequency_penalty`` and ``logit_bias``. The sampler alone on made-up logits, then each setting checked
against the model's own log-probabilities (``logprobs``), across cache reuse and a continued answer."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import app
from llm_backends.openai_api import chat_request
from llm_backends.request import SamplingParams, build_request
from llm_backends.sampling import Sampler

ASK = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
GREEDY = {"temperature": 0, "enable_thinking": False}


def params(**fields) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, **fields})


def test_logit_bias_is_added_before_the_pick_and_the_logits_are_left_as_they_were():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert Sampler(params(logit_bias=((0, -100.0),)), "cpu").pick(logits) == 1
    assert Sampler(params(logit_bias=((3, 3.5),)), "cpu").pick(logits) == 3
    assert logits.tolist() == [3.0, 2.0, 1.0, 0.0]  # logprobs are read from the same tensor


def test_presence_counts_once_and_frequency_each_time_over_the_reply_and_a_continued_answer():
    logits = torch.tensor([5.0, 4.5, 0.0])
    frequency = Sampler(params(frequency_penalty=0.3), "cpu")
    assert frequency.pick(logits) == 0
    frequency.said(0)  # 5.0 - 0.3 = 4.7: still first
    assert frequency.pick(logits) == 0
    frequency.said(0)  # 5.0 - 0.6 = 4.4
    assert frequency.pick(logits) == 1
    presence = Sampler(params(presence_penalty=0.3), "cpu")
    for _ in range(3):
        assert presence.pick(logits) == 0
        presence.said(0)  # 4.7 however often
    continued = Sampler(params(frequency_penalty=0.3), "cpu", answer_ids=[0, 0])
    assert continued.pick(logits) == 1
    negative = Sampler(params(presence_penalty=-1.0), "cpu", answer_ids=[1])  # a negative one encourages
    assert negative.pick(logits) == 1


def test_min_p_keeps_only_tokens_within_its_share_of_the_likeliest():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    for min_p, allowed in ((0.5, {0, 1}), (0.25, {0, 1, 2}), (1.0, {0})):
        sampler = Sampler(params(temperature=1.0, min_p=min_p, seed=7), "cpu")
        drawn = Counter(sampler.pick(logits) for _ in range(400))
        assert set(drawn) == allowed, (min_p, drawn)
    # Applied after top-p, which keeps the likeliest: min_p 0.5 and top_p 0.6 leave 0 and 1.
    both = Sampler(params(temperature=1.0, min_p=0.5, top_p=0.6, seed=1), "cpu")
    assert {both.pick(logits) for _ in range(200)} == {0, 1}


def kept_by_sorting(logits: torch.Tensor, top_p: float, min_p: float) -> dict[int, float]:
    """The tokens top-p and min-p keep, and their probabilities, worked out the plain way: sort everything."""
    probs, ids = torch.sort(torch.softmax(logits.double(), dim=-1), descending=True)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before <= top_p) & (probs >= min_p * probs[0])
    return dict(zip(ids[keep].tolist(), probs[keep].tolist(), strict=True))


@pytest.mark.parametrize("spread", [1.0, 3.0, 8.0])  # from a flat distribution (a huge head) to a peaked one
@pytest.mark.parametrize("top_p, min_p", [(0.9, 0.0), (0.5, 0.0), (0.999, 0.0), (1.0, 0.05), (0.95, 0.2)])
def test_top_p_and_min_p_without_top_k_keep_what_a_full_sort_keeps(spread, top_p, min_p):
    torch.manual_seed(int(spread * 10) + int(top_p * 1000))
    logits = torch.randn(262_144) * spread
    ids, weights = Sampler(params(temperature=1.0, top_p=top_p, min_p=min_p), "cpu").candidates(logits)
    kept = {int(i): float(w) for i, w in zip(ids, weights, strict=True) if w > 0}
    expected = kept_by_sorting(logits, top_p, min_p)
    # Float rounding may move a few tokens whose place is within a hair of a cut: a negligible mass.
    moved = list(set(kept) ^ set(expected))
    assert float(torch.softmax(logits.double(), -1)[moved].sum()) < 1e-5, (len(kept), len(expected))
    shared = set(kept) & set(expected)
    assert all(math.isclose(kept[t], expected[t], rel_tol=1e-4) for t in shared)


def test_a_draw_follows_the_weights_and_never_takes_a_token_cut():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    sampler = Sampler(params(temperature=1.0, seed=5), "cpu")
    drawn = Counter(sampler._draw(probs) for _ in range(20_000))
    assert set(drawn) == {0, 2, 4}
    for index in (0, 2, 4):
        assert abs(drawn[index] / 20_000 - float(probs[index])) < 0.015, drawn
    # Over the whole vocabulary (temperature alone): the same token for the same seed, and likely ones.
    logits = torch.randn(262_144) * 4
    first = [Sampler(params(temperature=1.0, seed=9), "cpu").pick(logits) for _ in range(2)]
    assert first[0] == first[1] and torch.softmax(logits, -1)[first[0]] > 1e-6


def test_only_the_plain_argmax_lets_a_runner_pick_in_its_shared_pass():
    assert Sampler(params(), "cpu").plain_greedy
    assert Sampler(params(min_p=0.5), "cpu").plain_greedy  # min_p changes nothing at temperature 0
    for changed in ({"presence_penalty": 0.5}, {"frequency_penalty": 0.1}, {"logit_bias": ((1, 1.0),)}):
        assert not Sampler(params(**changed), "cpu").plain_greedy, changed
    assert Sampler(params(presence_penalty=0.0, frequency_penalty=0.0), "cpu").plain_greedy


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"min_p": 1.5}, "min_p must be in"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in"),
        ({"frequency_penalty": "a lot"}, "frequency_penalty must be a number"),
        ({"logit_bias": [1, 2]}, "logit_bias must be an object"),
        ({"logit_bias": {"x": 1}}, "token ids"),
        ({"logit_bias": {"-3": 1}}, "token ids"),
        ({"logit_bias": {"5": 101}}, r"logit_bias\[5\] must be in"),
        ({"logit_bias": {"5": float("nan")}}, "finite"),
        ({"logit_bias": {"5": 10**400}}, "finite"),  # JSON allows an integer no float holds
        ({"presence_penalty": -(10**400)}, "finite"),
        ({"logit_bias": {"5": True}}, "must be a number"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "at most 1024"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(fields, needle):
    with pytest.raises(ValueError, match=needle):
        build_request(ASK, family=None, context_length=None, **fields)


def test_logit_bias_names_only_the_models_own_tokens_and_keys_may_be_numbers(qwen3):
    with pytest.raises(ValueError, match=f"ids are below {qwen3.vocab_size}"):
        chat_request(qwen3, {"messages": ASK, "logit_bias": {str(qwen3.vocab_size): 5}})
    request = qwen3.request(ASK, logit_bias={7: 2, "3": -1.5, "9": 0})
    assert request.sampling.logit_bias == ((3, -1.5), (7, 2.0))  # a zero changes nothing and is left out


def steps(model, max_tokens, **fields) -> tuple[list[int], list[dict]]:
    """The reply to ASK as the engine writes it (greedy unless ``fields`` say otherwise): its token ids, and each
    step's 20 likeliest tokens under the model itself (id -> log-probability, before any sampling setting)."""
    request = model.request(ASK, max_new_tokens=max_tokens, thinking=False, **{"temperature": 0, **fields})
    prompt_ids, _ = model.fit(request)
    run = model.engine.generate(prompt_ids, model.engine.new_entry(), request.sampling, logprobs=20)
    ids = list(run)
    return ids, [dict(top) for _, top in run.logprobs]


def reply_ids(model, messages, max_tokens, **fields) -> list[int]:
    out = model.create(messages, max_tokens=max_tokens, **fields)
    text = out["choices"][0]["message"]["content"]
    return model.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_greedy_with_penalties_picks_the_best_penalised_token_each_step_and_cache_reuse_keeps_it(name, request):
    """Each pick is the argmax of the model's own log-probabilities after OpenAI's penalties over the reply so
    far (a check written apart from the sampler); the same request again, from the cache, gives the same
    reply; the plain greedy reply repeats itself, the penalised one less."""
    model = request.getfixturevalue(name)
    plain = model.create(ASK, max_tokens=24, **GREEDY)["choices"][0]["message"]["content"]
    fields = {"presence_penalty": 0.7, "frequency_penalty": 0.9, **GREEDY}
    ids, tops = steps(model, 24, presence_penalty=0.7, frequency_penalty=0.9)
    assert len(ids) >= 12
    for i, (token, top) in enumerate(zip(ids, tops, strict=True)):
        counts = Counter(ids[:i])

        def penalised(t, top=top, counts=counts):
            return top[t] - 0.9 * counts[t] - (0.7 if counts[t] else 0.0)

        assert token in top
        assert max(top, key=penalised) == token or math.isclose(penalised(token), max(map(penalised, top))), i
    texts = {model.create(ASK, max_tokens=24, user=f"{name}-again", **fields)["choices"][0]["message"]["content"]}
    texts.add(model.create(ASK, max_tokens=24, user=f"{name}-again", **fields)["choices"][0]["message"]["content"])
    assert len(texts) == 1
    assert plain not in texts


@pytest.mark.parametrize("name", ["qwen3", "embedded"])
def test_a_continued_answer_with_penalties_counts_the_answer_as_its_own(name, request):
    """Continue goes on exactly as a larger max_tokens would: the answer's tokens count for the presence and
    frequency penalties as the reply's own."""
    model = request.getfixturevalue(name)
    fields = {"presence_penalty": 1.2, "frequency_penalty": 0.8, **GREEDY}
    whole = model.create(ASK, max_tokens=24, **fields)["choices"][0]["message"]["content"]
    start = model.create(ASK, max_tokens=9, user=f"{name}-cut", **fields)["choices"][0]["message"]["content"]
    more = model.create(
        [*ASK, {"role": "assistant", "content": start}],
        max_tokens=15,
        user=f"{name}-cut",
        continue_final_message=True,
        **fields,
    )["choices"][0]["message"]["content"]
    assert start + more == whole


def test_logit_bias_bans_or_forces_a_token_on_the_embedded_model(embedded):
    plain = reply_ids(embedded, ASK, 8, temperature=0)
    banned = reply_ids(embedded, ASK, 8, temperature=0, logit_bias={str(plain[0]): -100})
    assert plain[0] not in banned
    forced = embedded.tokenizer.encode(" bread", add_special_tokens=False)
    assert len(forced) == 1
    out = embedded.create(ASK, max_tokens=6, temperature=0, logit_bias={forced[0]: 100})
    assert out["choices"][0]["message"]["content"] == " bread" * 6


def test_min_p_draws_only_tokens_within_its_share_of_the_likeliest_on_the_embedded_model(embedded):
    """Sampled at temperature 1 with min_p 0.3: every token drawn has at least 0.3 times the probability of the
    step's likeliest (the model's own log-probabilities); min_p 1 draws the greedy answer."""
    ids, tops = steps(embedded, 40, temperature=1.0, top_p=1.0, top_k=0, min_p=0.3, seed=3)
    for token, top in zip(ids, tops, strict=True):
        assert top[token] >= max(top.values()) + math.log(0.3) - 1e-4
    # Without it the same draws take unlikely tokens.
    ids, tops = steps(embedded, 40, temperature=1.0, top_p=1.0, top_k=0, seed=3)
    assert any(top.get(t, -math.inf) < max(top.values()) + math.log(0.3) for t, top in zip(ids, tops, strict=True))
    greedy = embedded.create(ASK, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    only_best = embedded.create(ASK, max_tokens=16, temperature=1.0, min_p=1.0, seed=5)
    assert only_best["choices"][0]["message"]["content"] == greedy


def test_the_pages_controls_reach_the_request_and_at_their_defaults_are_left_unset(qwen3):
    base = dict(system_prompt="", temperature=0, top_p=1, top_k=0, max_new_tokens=16, repetition_penalty=1, seed=-1)
    plain = app.ChatSettings(**base, thinking=False).request(qwen3, ASK, None).sampling
    assert (plain.min_p, plain.presence_penalty, plain.frequency_penalty) == (None, None, None)
    settings = app.ChatSettings(**base, thinking=False, min_p=0.05, presence_penalty=1.5, frequency_penalty=-0.5)
    sampling = settings.request(qwen3, ASK, None).sampling
    assert (sampling.min_p, sampling.presence_penalty, sampling.frequency_penalty) == (0.05, 1.5, -0.5)
