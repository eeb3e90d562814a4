"""A Qwen 3 thinking budget: after N reasoning tokens the model is made to write Qwen's cut-off words and the
end-of-thinking tag, then answers; the cache stays exact; bad budgets are refused where they cannot apply."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

import app
from llm_backends import SessionKey, build_request
from llm_backends.engine import ThinkingBudget
from llm_backends.families import qwen3 as qwen3_family
from llm_backends.serving import ModelRegistry

ASK = [{"role": "user", "content": "Why is the sky blue? Think it through."}]


def reply(model, budget, **fields):
    stream = model.stream_chat(ASK, enable_thinking=True, temperature=0, thinking_budget=budget, **fields)
    chunks = list(stream)
    return "".join(c.reasoning for c in chunks), "".join(c.text for c in chunks), chunks[-1]


def test_reasoning_stops_at_the_budget_with_qwens_words_then_the_model_answers(qwen3):
    budget = 12
    cutoff = qwen3.cutoff_ids
    assert cutoff[-1] == qwen3.think_ids[1] and len(cutoff) > 5
    reasoning, answer, last = reply(qwen3, budget, max_new_tokens=budget + len(cutoff) + 12, session_id="budget")
    free, _, _ = reply(qwen3, None, max_new_tokens=budget + len(cutoff) + 12)
    assert "Considering the limited time by the user" in reasoning, reasoning
    assert "Considering the limited time" not in free, "without a budget the model thinks on"
    ledger = qwen3.sessions._entries[SessionKey("python", "", "budget")].ids
    written = ledger[last.stats.prompt_tokens :]
    assert tuple(written[budget : budget + len(cutoff)]) == cutoff, "N free tokens, then the cut-off, forced"
    assert answer, "the answer follows the cut-off"


def test_the_turn_after_a_budgeted_reply_reuses_the_cache_and_equals_a_recompute(qwen3):
    first_reasoning, first_answer, _ = reply(qwen3, 8, max_new_tokens=40, session_id="budget-2")
    history = [*ASK, {"role": "assistant", "content": first_answer}, {"role": "user", "content": "And at sunset?"}]
    cached = list(qwen3.stream_chat(history, session_id="budget-2", temperature=0, max_new_tokens=12))
    fresh = list(qwen3.stream_chat(history, temperature=0, max_new_tokens=12))
    assert cached[-1].stats.cached_tokens > 0
    assert "".join(c.text + c.reasoning for c in cached) == "".join(c.text + c.reasoning for c in fresh)


def test_a_budget_larger_than_the_reasoning_changes_nothing(qwen3):
    assert reply(qwen3, 4000, max_new_tokens=30)[:2] == reply(qwen3, None, max_new_tokens=30)[:2]


def test_the_constraint_forces_only_after_the_budget_and_stops_at_the_end_tag():
    import torch

    budget = ThinkingBudget(2, cutoff=(7, 8, 9), end_id=9)
    logits = torch.zeros(12)
    for token in (3, 4):  # free reasoning
        assert torch.equal(budget.mask(logits), logits)
        budget.advance(token)
    for forced in (7, 8, 9):
        masked = budget.mask(logits)
        assert int(masked.argmax()) == forced and torch.isinf(masked).sum() == 11
        budget.advance(forced)
    assert torch.equal(budget.mask(logits), logits), "after the end tag the answer is free"
    early = ThinkingBudget(5, cutoff=(7, 8, 9), end_id=9)
    early.advance(9)  # the model closed its reasoning by itself
    for _ in range(10):
        early.advance(1)
    assert torch.equal(early.mask(logits), logits)


def test_budgets_are_refused_where_they_cannot_apply(gemma3, qwen3):
    with pytest.raises(ValueError, match="thinking_budget needs a model that thinks"):
        gemma3.stream_chat(ASK, thinking_budget=10)
    for bad in (0, -3, 1.5, "ten", True):
        with pytest.raises(ValueError, match="thinking_budget"):
            qwen3.stream_chat(ASK, thinking_budget=bad)
    off = build_request(ASK, family=qwen3_family.FAMILY, context_length=4096, thinking=False, thinking_budget=10)
    assert off.thinking_budget is None, "a reply that does not think has no budget"


def test_the_api_takes_thinking_budget(qwen3_dir):
    from fastapi import FastAPI

    from llm_backends.http_api import add_openai_routes

    registry = ModelRegistry([str(qwen3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    routes = FastAPI()
    add_openai_routes(routes, registry, api_key=None, exposed=False)
    client = openai.OpenAI(base_url="http://test/v1", api_key="x", http_client=TestClient(routes))
    out = client.chat.completions.create(
        model=registry.ids[0],
        messages=ASK,
        max_tokens=60,
        temperature=0,
        extra_body={"enable_thinking": True, "thinking_budget": 6},
    )
    assert "Considering the limited time" in out.choices[0].message.model_extra["reasoning_content"]
    with pytest.raises(openai.BadRequestError, match="thinking_budget"):
        client.chat.completions.create(model=registry.ids[0], messages=ASK, extra_body={"thinking_budget": 0})


def test_the_pages_budget_reaches_the_request_only_when_thinking(qwen3):
    base = dict(system_prompt="", temperature=0, top_p=1, top_k=0, max_new_tokens=16, repetition_penalty=1, seed=-1)
    thinking = app.ChatSettings(**base, thinking=True, thinking_budget=64).request(qwen3, ASK, None)
    assert thinking.thinking_budget == 64
    for settings in (
        app.ChatSettings(**base, thinking=False, thinking_budget=64),
        app.ChatSettings(**base, thinking=True),
    ):
        assert settings.request(qwen3, ASK, None).thinking_budget is None


def test_a_budget_left_from_a_local_model_is_not_sent_to_a_remote_one(qwen3):
    from llm_backends.backend import Capabilities, ChatModel, ModelInfo

    class Remote(ChatModel):
        info = ModelInfo("up", None, "remote", "openai:x", "remote")
        capabilities = Capabilities(thinking=True)

        def stream(self, request):
            raise AssertionError

        def count_tokens(self, request):
            return None

        def cache_info(self):
            return {}

        def clear_sessions(self, session=None):
            pass

    base = dict(system_prompt="", temperature=0, top_p=1, top_k=0, max_new_tokens=16, repetition_penalty=1, seed=-1)
    settings = app.ChatSettings(**base, thinking=True, thinking_budget=64)
    assert settings.request(Remote(), ASK, None).thinking_budget is None
