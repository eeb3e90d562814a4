"""Tiny random Gemma 3 and Qwen 3 checkpoints with tokenizers trained here, saved as real folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3TextConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.models.gemma3 import Gemma3ForCausalLM

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, how are you today?",
    "Tell me about the sea, the sky and the mountains. What is the capital of France? Paris.",
    "I think therefore I am. Let me think step by step about this question.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。中文是一等公民。",
    "Emoji test 😀🎉 and accents: café, naïve, Zürich, São Paulo.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, code: def f(x): return x * 2",
] * 20

# Qwen 3's template: tools in the system turn, calls as <tool_call> blocks, results as <tool_response> in a
# user turn; earlier turns lose their <think> blocks; thinking off adds an empty one.
QWEN3_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 and index <= ns.last_query_index %}{%- set ns.last_query_index = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content %}{%- set reasoning_content = '' %}
{%- if '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}
{%- endfor %}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


def _tokenizer(special: list[str], added: list[str], vocab_size: int = 600) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens(added)
    return tokenizer


def _init(model, seed: int, scale: float):
    # Larger weights than the default init spread the logits, so greedy choices are far from ties.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def _gemma3_tokenizer(image_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Gemma's special tokens (and, for a vision model, its image tokens named as Gemma's tokenizer names them)."""
    extra = {"extra_special_tokens": image_tokens} if image_tokens else {}
    raw = _tokenizer(GEMMA3_SPECIAL + list((image_tokens or {}).values()), [])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", **extra
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


def _gemma3_text_config(tokenizer, sliding_window: int) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )


def build_gemma3(folder: Path, *, sliding_window: int = 16, with_template: bool = False) -> Path:
    """A 6-layer Gemma 3 (5 sliding layers, then 1 global) with a window of ``sliding_window`` tokens."""
    tokenizer = _gemma3_tokenizer()
    if with_template:
        from llm_backends.families.gemma3 import GEMMA3_TEMPLATE

        tokenizer.chat_template = GEMMA3_TEMPLATE
    config = _gemma3_text_config(tokenizer, sliding_window)
    torch.manual_seed(0)
    model = _init(Gemma3ForCausalLM(config), seed=1, scale=0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_qwen3(folder: Path) -> Path:
    """A 2-layer Qwen 3 with Qwen's special tokens and a template that strips earlier thinking."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = _tokenizer(special, ["<think>", "</think>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN3_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = _init(Qwen3ForCausalLM(config), seed=2, scale=0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_gemma3_vision(
    folder: Path, *, image_size: int = 32, tokens_per_image: int = 4, sliding_window: int = 16
) -> Path:
    """A tiny Gemma 3 vision model (image-text-to-text): the text decoder of ``build_gemma3`` with a
    1-layer SigLIP tower, and a processor whose tokenizer declares Gemma's image tokens."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        SiglipVisionConfig,
    )

    from llm_backends.families.gemma3 import GEMMA3_TEMPLATE

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _gemma3_tokenizer(image_tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in image_tokens.items()}
    text = _gemma3_text_config(tokenizer, sliding_window)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=image_size // 4,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = _init(Gemma3ForConditionalGeneration(config), seed=3, scale=0.3)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    tokenizer.chat_template = GEMMA3_TEMPLATE
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
