"""Qwen 3: `<|im_end|>` ends a reply; `<think>...</think>` carries reasoning; sampling differs per mode."""

from .base import Family, SamplingDefaults

FAMILY = Family(
    name="qwen3",
    model_types=("qwen3", "qwen3_moe"),
    stop_tokens=("<|im_end|>",),
    # Qwen's model card: thinking 0.6/0.95/20, non-thinking 0.7/0.8/20.
    sampling=SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20),
    thinking_sampling=SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20),
    think_tags=("<think>", "</think>"),
    user_turn="<|im_start|>user",
    # The words Qwen's own documentation inserts when a thinking budget runs out.
    thinking_cutoff=(
        "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
        "directly now.\n</think>\n\n"
    ),
    # Fill-in-the-middle and repository markers: added tokens, not special ones, and not in the chat template.
    control_tokens=(
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ),
)
