"""The data a family contributes; the engine reads it and never branches on a family's name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    """A family's recommended sampling for one mode; ``request.build_request`` fills unset fields from it."""

    temperature: float
    top_p: float
    top_k: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Family:
    """What one model family needs that others do not.

    ``fallback_chat_template`` is used only when a checkpoint ships no chat template;
    ``think_tags`` names the tokens that open and close reasoning (None: the family cannot think);
    ``user_turn`` is how the template begins a user's turn (restore points are kept there);
    ``thinking_cutoff`` is what the model is made to write when its thinking budget is spent, up to the closing
    think tag (default: just that tag).
    """

    name: str
    model_types: tuple[str, ...]
    stop_tokens: tuple[str, ...]
    sampling: SamplingDefaults
    thinking_sampling: SamplingDefaults | None = None
    think_tags: tuple[str, str] | None = None
    fallback_chat_template: str | None = None
    user_turn: str | None = None
    thinking_cutoff: str | None = None

    @property
    def can_think(self) -> bool:
        return self.think_tags is not None

    def sampling_defaults(self, thinking: bool = False) -> SamplingDefaults:
        if thinking and self.thinking_sampling is not None:
            return self.thinking_sampling
        return self.sampling
