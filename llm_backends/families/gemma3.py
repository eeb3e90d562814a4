"""Gemma 3: `<end_of_turn>` ends a reply, no system role, and Google's turn format for bare checkpoints."""

from .base import Family, SamplingDefaults

# Gemma's documented turn format (what instruction-tuned checkpoints ship, images as typed parts included; the
# tests' tiny models use it). Gemma
# has no system role: the system prompt is folded into the first user turn, as the official template does. Base
# checkpoints (the embedded default) ship no template and are asked in families.base.BASE_MODEL_TEMPLATE.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

FAMILY = Family(
    name="gemma3",
    model_types=("gemma3", "gemma3_text"),
    stop_tokens=("<end_of_turn>",),
    # Google's recommended settings for Gemma 3.
    sampling=SamplingDefaults(temperature=1.0, top_p=0.95, top_k=64),
    user_turn="<start_of_turn>user",
)
