"""The surfaces of the module this project grew from: LoadModel, Gemma3Object, Qwen3Object."""

from __future__ import annotations

import pytest

from llm_backends import Gemma3Object, LoadModel, Qwen3Object


def test_load_model_predict_keeps_each_uid_conversation(gemma3_dir):
    bot = LoadModel(str(gemma3_dir))
    bot.initialize("You are brief.", uid="u1")
    first = list(bot.predict("Hello, how are you today?", "u1", temperature=0, max_new_tokens=6))
    assert all(isinstance(p, str) for p in first)
    list(bot.predict("And the sea?", "u1", temperature=0, max_new_tokens=6))
    history = bot._histories["u1"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "".join(first)
    list(bot.predict("Hi", "u2", temperature=0, max_new_tokens=4))
    assert [m["role"] for m in bot._histories["u2"]] == ["user", "assistant"]
    assert bot.model.cache_info()["sessions"] == 2
    bot.initialize(None, uid="u1")
    assert bot._histories["u1"] == [] and bot.model.cache_info()["sessions"] == 1


def test_family_objects_check_the_family(gemma3_dir, qwen3_dir):
    assert Gemma3Object(str(gemma3_dir)).get_model_info()["family"] == "gemma3"
    assert Qwen3Object(str(qwen3_dir)).get_model_info()["family"] == "qwen3"
    with pytest.raises(ValueError, match="qwen3 model, not gemma3"):
        Gemma3Object(str(qwen3_dir))


def test_create_on_the_seed_object(qwen3_dir):
    out = Qwen3Object(str(qwen3_dir)).create([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
    assert out["object"] == "chat.completion"
