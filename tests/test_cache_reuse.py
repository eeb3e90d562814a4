"""Reusing a session's cache never changes an answer: greedy replies with reuse equal a fresh computation."""

from __future__ import annotations

import pytest

from llm_backends.session_cache import common_prefix_len

GREEDY = {"temperature": 0, "max_new_tokens": 24}


def reply(model, messages, session_id=None, **kwargs):
    chunks = list(model.stream_chat(messages, session_id=session_id, **{**GREEDY, **kwargs}))
    text = "".join(c.text for c in chunks)
    reasoning = "".join(c.reasoning for c in chunks)
    return text, reasoning, chunks[-1]


class Conversation:
    """Drives one session through a script and checks every reply against a cache-free recomputation."""

    def __init__(self, model, session_id: str, *, restore_points: bool = True, **kwargs):
        self.model = model
        self.restore_points = restore_points
        self.session_id = session_id
        self.kwargs = kwargs
        self.messages: list[dict] = []
        self.cached: list[int] = []
        self.prompts: list[int] = []
        self.prompt_ids: list[list[int]] = []

    def ask(self, content: str, **kwargs) -> str:
        self.messages.append({"role": "user", "content": content})
        return self._answer(**kwargs)

    def _answer(self, **kwargs) -> str:
        kwargs = {**self.kwargs, **kwargs}
        text, reasoning, last = reply(self.model, self.messages, self.session_id, **kwargs)
        fresh_text, fresh_reasoning, fresh_last = reply(self.model, self.messages, None, **kwargs)
        assert (text, reasoning) == (fresh_text, fresh_reasoning), (
            f"reuse changed the answer at turn {len(self.prompts)}"
        )
        assert last.stats.completion_tokens == fresh_last.stats.completion_tokens
        assert last.stats.prompt_tokens == fresh_last.stats.prompt_tokens
        assert fresh_last.stats.cached_tokens == 0
        self.cached.append(last.stats.cached_tokens)
        self.prompts.append(last.stats.prompt_tokens)
        thinking = kwargs.get("enable_thinking")
        self.prompt_ids.append(self.model.render(self.messages, enable_thinking=thinking is not False))
        self.messages.append({"role": "assistant", "content": text})
        return text

    def retry(self, **kwargs) -> str:
        self.messages.pop()
        return self._answer(**kwargs)

    def undo(self) -> None:
        del self.messages[-2:]

    def edit(self, index: int, content: str) -> str:
        self.messages[index] = {"role": self.messages[index]["role"], "content": content}
        del self.messages[index + 1 :]
        return self._answer()

    def ask_and_stop(self, content: str, after_chunks: int) -> str:
        """Streams a reply and closes it early, keeping the partial answer as the chat would."""
        self.messages.append({"role": "user", "content": content})
        stream = self.model.stream_chat(self.messages, session_id=self.session_id, **{**GREEDY, **self.kwargs})
        parts = []
        for i, chunk in enumerate(stream):
            parts.append(chunk.text)
            if i + 1 >= after_chunks:
                break
        stream.close()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        return "".join(parts)

    def shared(self, earlier: int, later: int = -1) -> int:
        """Tokens two turns' prompts have in common: what the template itself lets a cache reuse."""
        return common_prefix_len(self.prompt_ids[earlier], self.prompt_ids[later])


SCRIPT_TURNS = [
    "Hello, how are you today?",
    "Tell me about the sea and the sky.",
    "What is the capital of France?",
    "你好，世界！今天天气很好。",
    "Let me think step by step about this question.",
    "Numbers 0 1 2 3 4 5, code: def f(x): return x * 2",
]


def run_script(conversation: Conversation) -> Conversation:
    c = conversation
    for turn in SCRIPT_TURNS[:3]:
        c.ask(turn)
    assert c.cached[1] >= c.shared(0, 1) and c.cached[2] >= c.shared(1, 2), "continuing turns reuse history"
    assert c.shared(1, 2) > c.prompts[0], "the second turn's prompt reaches past the first one's"
    c.retry()
    if c.restore_points:
        assert c.cached[-1] == c.prompts[-1], "a retry resumes from the restore point at the prompt's end"
    else:
        assert c.cached[-1] == c.prompts[-1] - 1, "a retry re-reads only the prompt's last token"
    c.ask(SCRIPT_TURNS[3])
    c.undo()
    c.ask(SCRIPT_TURNS[4])
    assert c.cached[-1] >= c.shared(2), "an undo resumes from the turn before"
    c.ask_and_stop(SCRIPT_TURNS[5], after_chunks=2)
    c.ask("And now?")
    assert c.cached[-1] >= c.shared(-2), "a stopped answer is kept and reused"
    c.edit(1 if c.messages[0]["role"] == "system" else 0, "An edited first question about mountains.")
    system = c.messages[0]["role"] == "system"
    head = c.model.operator_tokens(c.model.request(c.messages[:2])) if system else 0
    assert c.cached[-1] < max(12, head + 1), "an edit of the first message reuses the head and system prompt only"
    for turn in SCRIPT_TURNS[:2]:
        c.ask(turn)
    return c


def test_gemma3_reuse_equals_recompute_across_a_script(gemma3):
    c = run_script(Conversation(gemma3, "gemma-script", max_new_tokens=24))
    assert sum(c.cached) > 0
    assert max(c.prompts) > 16 * 4, "the script goes well past the sliding window"


def test_gemma3_with_system_prompt_reuse_equals_recompute(gemma3):
    c = Conversation(gemma3, "gemma-system")
    c.messages.append({"role": "system", "content": "You are brief."})
    run_script(c)


def test_gemma3_past_its_window_resumes_from_restore_points(gemma3):
    c = Conversation(gemma3, "gemma-window", max_new_tokens=40)
    c.ask("Tell me about the sea, the sky and the mountains. " * 3)
    c.ask("What is the capital of France? Paris. " * 2)
    assert c.prompts[-1] > 16 * 5
    c.retry()
    # A sliding cache past its window cannot be cropped: the restore point at the prompt's end serves.
    assert c.cached[-1] == c.prompts[-1]
    c.undo()
    c.ask("A different second question.")
    assert c.cached[-1] >= c.shared(0)


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_reuse_equals_recompute_across_a_script(qwen3, thinking):
    c = run_script(Conversation(qwen3, f"qwen-script-{thinking}", enable_thinking=thinking))
    assert sum(c.cached) > 0


def test_qwen3_switching_thinking_mid_conversation_stays_exact(qwen3):
    c = Conversation(qwen3, "qwen-switch")
    c.ask("Hello, how are you today?", enable_thinking=True)
    c.ask("What is the capital of France?", enable_thinking=False)
    c.ask("Let me think step by step.", enable_thinking=True)
    assert c.cached[1] >= c.shared(0, 1) > 0 and c.cached[2] >= c.shared(1, 2) > 0


def test_qwen3_earlier_thinking_is_dropped_by_the_template_and_reuse_stays_exact(qwen3):
    # History written by a client that kept the reasoning in the content: the template strips it from
    # earlier turns, so turn N's tokens are not a prefix of turn N+1's.
    c = Conversation(qwen3, "qwen-think-history")
    c.ask("Hello, how are you today?")
    c.messages[-1]["content"] = "<think>\nI think therefore I am.\n</think>\n\n" + c.messages[-1]["content"]
    c.ask("Tell me about the sea.")
    assert c.cached[1] >= c.shared(0, 1) > 0


def test_sessions_do_not_share_caches(qwen3):
    a = [{"role": "user", "content": "Hello, how are you today?"}]
    b = [{"role": "user", "content": "What is the capital of France?"}]
    reply(qwen3, a, "iso-a")
    _, _, last = reply(qwen3, b, "iso-b")
    assert last.stats.cached_tokens == 0
    _, _, last = reply(qwen3, a, "iso-a")
    assert last.stats.cached_tokens == last.stats.prompt_tokens


def conversation_in_one_request(turns: int, tag: str) -> list[dict]:
    """A chat that arrives whole (an API client resuming it, a chat reopened from history); ``tag`` makes it
    differ from other tests' chats from the first message on, so no other session can lend it a prefix."""
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"{tag} Question {i}: tell me about the sea and the sky."})
        messages.append({"role": "assistant", "content": f"Answer {i}: the sea is wide and the sky is high."})
    messages.append({"role": "user", "content": "And the mountains?"})
    return messages


@pytest.mark.parametrize("back", [1, 3, 8])
def test_an_edit_of_any_of_the_last_8_turns_of_a_whole_conversation_rereads_only_from_there(gemma3, back):
    messages = conversation_in_one_request(10, f"[{back}]")
    session = f"whole-{back}"
    _, _, first = reply(gemma3, messages, session)
    assert first.stats.cached_tokens == 0 and first.stats.prompt_tokens > 16 * 10, "far past the 16-token window"
    edited = [dict(m) for m in messages]
    index = len(edited) - 1 - 2 * back  # the user message `back` turns before the last one
    edited[index] = {"role": "user", "content": "An edited question about the desert."}
    del edited[index + 1 :]
    text, _, last = reply(gemma3, edited, session)
    fresh_text, _, fresh = reply(gemma3, edited)
    assert text == fresh_text, "reuse from a restore point changed the answer"
    unchanged = common_prefix_len(gemma3.render(messages), gemma3.render(edited))
    # Restore points sit where turns begin: the edited turn is re-read, everything before it is not.
    assert last.stats.cached_tokens >= unchanged - 8, (last.stats.cached_tokens, unchanged)
