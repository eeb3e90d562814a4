"""The surfaces of the module this project grew from: LoadModel(path).predict(prompt, uid), per-uid history."""

from __future__ import annotations

from collections.abc import Iterator

from .backend import ChatModel, ChatStream
from .loading import load_model
from .request import SessionKey

THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"


class LoadModel:
    """A model plus one conversation per uid. ``predict`` yields the reply in pieces and remembers it."""

    family: str | None = None

    def __init__(self, path=None, **load_kwargs):
        self.model: ChatModel = load_model(path, **load_kwargs)
        if self.family is not None and self.model.info.family != self.family:
            raise ValueError(f"{path} is a {self.model.info.family} model, not {self.family}")
        self._histories: dict[str, list[dict]] = {}

    @staticmethod
    def _session(uid) -> SessionKey:
        return SessionKey("seed", "", str(uid))

    def initialize(self, sys_prmt: str | None, uid) -> None:
        """Starts uid's conversation afresh, with ``sys_prmt`` as its system prompt (None or "" for none)."""
        if sys_prmt is not None and not isinstance(sys_prmt, str):
            raise ValueError("sys_prmt must be a string or None")
        self._histories[str(uid)] = [{"role": "system", "content": sys_prmt}] if sys_prmt else []
        self.model.clear_cache(self._session(uid))

    def predict(self, prompt: str, uid, **sampling) -> Iterator[str]:
        """Yields the reply to ``prompt`` in uid's conversation as text pieces, reasoning included as the model
        writes it (``<think>...</think>`` before the answer), so a long thought streams too. The answer alone
        joins the history, also when the consumer stops early (as the chat would show the partial answer)."""
        history = self._histories.setdefault(str(uid), [])
        messages = [*history, {"role": "user", "content": prompt}]
        thinking = sampling.pop("enable_thinking", None)
        request = self.model.request(messages, session=self._session(uid), thinking=thinking, **sampling)
        return self._pieces(self.model.stream(request), history, messages)

    @staticmethod
    def _pieces(stream: ChatStream, history: list[dict], messages: list[dict]) -> Iterator[str]:
        reply, thinking = [], False
        try:
            with stream:
                for chunk in stream:
                    if chunk.reasoning:
                        yield (THINK_OPEN if not thinking else "") + chunk.reasoning
                        thinking = True
                    if chunk.text:
                        if thinking:
                            yield THINK_CLOSE
                            thinking = False
                        reply.append(chunk.text)
                        yield chunk.text
                if thinking:
                    yield THINK_CLOSE
        finally:
            history[:] = [*messages, {"role": "assistant", "content": "".join(reply)}]

    def create(self, messages, **kwargs):
        return self.model.create(messages, **kwargs)

    def get_model_info(self) -> dict:
        return self.model.get_model_info()

    def clear_cache(self) -> None:
        self.model.clear_cache()


class Gemma3Object(LoadModel):
    family = "gemma3"


class Qwen3Object(LoadModel):
    family = "qwen3"
