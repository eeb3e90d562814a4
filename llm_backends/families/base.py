"""The data a family contributes; the engine reads it and never branches on a family's name."""

from __future__ import annotations

from dataclasses import dataclass

# A checkpoint that ships no chat template is a base model: it continues text. Asked as a "Question: ...
# Answer:" transcript (the system prompt as a first paragraph), the embedded Gemma 3 270M answered 13 of 20 short
# questions on topic, against 9 for a "User:/Assistant:" transcript with a preamble, 6 without one, and 2 for
# Gemma's own turn format (benchmarks/base_formats.py; docs/benchmarks.md). A reply ends where the model starts
# a turn of its own (a new question or answer line).
BASE_MODEL_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] | trim }}{{ '\n\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Answer: ' + (message['content'] | trim) + '\n\n' }}"
    "{%- else -%}"
    "{{ 'Question: ' + (message['content'] | trim) + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)
BASE_MODEL_STOP = ("\nQuestion:", "\nAnswer:")
BASE_MODEL_TURN = "Question:"


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

    ``think_tags`` names the tokens that open and close reasoning (None: the family cannot think);
    ``user_turn`` is how the template begins a user's turn (restore points are kept there);
    ``thinking_cutoff`` is what the model is made to write when its thinking budget is spent, up to the closing
    think tag (default: just that tag); ``control_tokens`` are added tokens that steer the model although neither
    the tokenizer calls them special nor the chat template writes them (typed by a caller they are text).
    """

    name: str
    model_types: tuple[str, ...]
    stop_tokens: tuple[str, ...]
    sampling: SamplingDefaults
    thinking_sampling: SamplingDefaults | None = None
    think_tags: tuple[str, str] | None = None
    user_turn: str | None = None
    thinking_cutoff: str | None = None
    control_tokens: tuple[str, ...] = ()

    @property
    def can_think(self) -> bool:
        return self.think_tags is not None

    def sampling_defaults(self, thinking: bool = False) -> SamplingDefaults:
        if thinking and self.thinking_sampling is not None:
            return self.thinking_sampling
        return self.sampling
