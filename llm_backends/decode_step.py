"""One decode step for several sessions at once (one new token each), written out for the text decoders of
Gemma 3 and Qwen 3.

It runs the same operations, in the same order and on the same modules, as transformers' forward with the
row-aware attention of ``batching.py``, so with ``fused_attention=False`` its logits are bitwise the same (a
test holds it to that); what it leaves out is the per-call machinery around them (mask construction, keyword
plumbing, output classes, hooks), which cost about as much as the arithmetic of a decode step on a 2-core
CPU. By default, on a CPU in fp32, the attention of all rows is one call of the C++ kernel instead.

With int8 weights on a CPU the whole step is one C++ call (``kernels/decode_step.cpp``, bitwise the same
logits), which also reads several tokens per session (``feed``): a short piece of an arriving prompt then
shares the pass with the other sessions' next tokens.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

import torch

from . import cpu_kernels, kv_layers

# Attention classes this step knows, and whether they normalise queries and keys before moving the head
# dimension forward (Qwen 3) or after (Gemma 3), as their own forward does.
ATTENTIONS = {"Gemma3Attention": False, "Qwen3Attention": True}


class DecodeStep:
    """Call with the sessions' caches, their new tokens and positions; returns logits, one row each."""

    def __init__(self, model, *, fused_attention: bool = True, native: bool = True):
        self.model = model
        self.decoder = _text_decoder(model)
        self.layers = list(self.decoder.layers)
        attention = self.layers[0].self_attn
        self.norm_first = ATTENTIONS[type(attention).__name__]
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.attend = sdpa_attention_forward
        config = model.config.get_text_config()
        self.layer_types = getattr(config, "layer_types", None)
        rotary = self.decoder.rotary_emb
        self.rotary_by_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma's layers normalise the attention and MLP outputs again before adding them back.
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")
        # On a CPU in fp32, all rows' attention in one call of the C++ kernel, 2-3x faster than a call of
        # torch's sdpa per row and independent of which rows share the step (see cpu_kernels.py).
        parameter = next(model.parameters())
        self.device = parameter.device  # where token ids go (found once, not on every step)
        self.fused_attention = (
            fused_attention
            and parameter.device.type == "cpu"
            and getattr(attention, "attn_logit_softcapping", None) is None
            and cpu_kernels.available()
        )

        # The whole step in one C++ call (kernels/decode_step.cpp) where every piece is one it knows.
        self.native = _native_step(self) if self.fused_attention and native else None

    @classmethod
    def for_model(cls, model, **options) -> DecodeStep | None:
        """The step for ``model``, or None where it is not a text decoder this step knows."""
        decoder = _text_decoder(model)
        layers = getattr(decoder, "layers", None)
        if not layers or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "embed_tokens"):
            return None
        if any(type(layer.self_attn).__name__ not in ATTENTIONS for layer in layers):
            return None
        # Calling submodules directly skips accelerate's hooks, which move tensors for a model spread over
        # several devices or offloaded: leave such models to transformers' own forward.
        if len(set((getattr(model, "hf_device_map", None) or {"": 0}).values())) > 1:
            return None
        return cls(model, **options)

    def _positions(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        rotary = self.decoder.rotary_emb
        if not self.rotary_by_type:
            return {None: rotary(hidden, positions)}
        return {kind: rotary(hidden, positions, kind) for kind in set(self.layer_types)}

    @torch.inference_mode()
    def __call__(self, caches: Sequence, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        if self.native is not None:
            return self.feed(caches, [[t] for t in tokens], positions, range(len(tokens)))
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[p] for p in positions], dtype=torch.long, device=self.device)
        hidden = self.decoder.embed_tokens(ids)
        rotations = self._positions(hidden, position_ids)
        for index, layer in enumerate(self.layers):
            kind = self.layer_types[index] if self.rotary_by_type else None
            hidden = self._layer(layer, hidden, rotations[kind], caches)
        hidden = self.decoder.norm(hidden)
        logits = self.model.lm_head(hidden[:, -1:, :])
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, -1]

    @torch.inference_mode()
    def feed(
        self, caches: Sequence, pieces: Sequence[Sequence[int]], positions: Sequence[int], wanted: Sequence[int]
    ) -> torch.Tensor:
        """The C++ step (``native`` only) for several tokens per session: ``pieces[i]`` go into ``caches[i]``
        from position ``positions[i]`` on. Returns the logits of the last token of the sessions in ``wanted``
        (indices), in that order."""
        step, kinds, templates = self.native
        counts = [len(piece) for piece in pieces]
        ids = torch.tensor([[t for piece in pieces for t in piece]], dtype=torch.long)
        places = [p + j for p, n in zip(positions, counts, strict=True) for j in range(n)]
        hidden = self.decoder.embed_tokens(ids)
        rotations = self._positions(hidden, torch.tensor([places], dtype=torch.long))
        slots = kv_layers.decode_slots(caches, counts, templates)
        if slots is None:
            raise RuntimeError("a cache layer of a kind the C++ step cannot write into")
        tokens = len(places)
        cos = [rotations[kind][0].reshape(tokens, -1).contiguous() for kind in kinds]
        sin = [rotations[kind][1].reshape(tokens, -1).contiguous() for kind in kinds]
        keys, values, spots = slots
        logits = step(hidden.reshape(tokens, -1), cos, sin, keys, values, torch.tensor(spots), counts, list(wanted))
        for cache, n in zip(caches, counts, strict=True):
            for layer in cache.layers:
                layer.decoded(n)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layer(self, layer, hidden: torch.Tensor, rotation, caches: Sequence) -> torch.Tensor:
        residual = hidden
        hidden = self._attention(layer.self_attn, layer.input_layernorm(hidden), rotation, caches)
        if self.sandwich:
            hidden = layer.post_attention_layernorm(hidden)
            hidden = residual + hidden
            residual = hidden
            hidden = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        else:
            hidden = residual + hidden
            residual = hidden
            hidden = layer.mlp(layer.post_attention_layernorm(hidden))
        return residual + hidden

    def _attention(self, attention, hidden: torch.Tensor, rotation, caches: Sequence) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        shape = (*input_shape, -1, attention.head_dim)
        if self.norm_first:
            query = attention.q_norm(attention.q_proj(hidden).view(shape)).transpose(1, 2)
            key = attention.k_norm(attention.k_proj(hidden).view(shape)).transpose(1, 2)
        else:
            query = attention.q_norm(attention.q_proj(hidden).view(shape).transpose(1, 2))
            key = attention.k_norm(attention.k_proj(hidden).view(shape).transpose(1, 2))
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = rotation
        query, key = self.rotate(query, key, cos, sin)
        if self.fused_attention and query.dtype == torch.float32:
            states = [
                cache.update(key[i : i + 1], value[i : i + 1], attention.layer_idx) for i, cache in enumerate(caches)
            ]
            out = cpu_kernels.ops().decode_attention(
                query.reshape(len(caches), -1, attention.head_dim),
                [k for k, _ in states],
                [v for _, v in states],
                attention.scaling,
            )
            return attention.o_proj(out.view(*input_shape, -1))
        rows = []
        for i, cache in enumerate(caches):
            keys, values = cache.update(key[i : i + 1], value[i : i + 1], attention.layer_idx)
            out, _ = self.attend(
                attention,
                query[i : i + 1],
                keys,
                values,
                None,
                dropout=0.0,
                scaling=attention.scaling,
                sliding_window=attention.sliding_window,
            )
            rows.append(out)
        out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
        return attention.o_proj(out.reshape(*input_shape, -1).contiguous())


def _native_step(step: DecodeStep):
    """(the C++ step, the rotation kinds its cos/sin lists follow, empty keys shaped as each layer's) for an int8
    model on a CPU whose layers are all of the pieces ``decode_step.cpp`` runs; None otherwise (the step above
    runs instead)."""
    from .int8_weights import Int8Linear

    ops = cpu_kernels.ops()
    head, final = step.model.get_output_embeddings(), step.decoder.norm
    if ops is None or not isinstance(head, Int8Linear) or not isinstance(final, cpu_kernels.FusedRMSNorm):
        return None
    kinds = sorted(set(step.layer_types)) if step.rotary_by_type else [None]
    empty = torch.empty(0)
    tensors, numbers = [], []
    activation = None
    for index, layer in enumerate(step.layers):
        attention, mlp = layer.self_attn, layer.mlp
        names = ["input_layernorm", "post_attention_layernorm"]
        if step.sandwich:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        layer_norms = [getattr(layer, name) for name in names]
        layer_norms[1:1] = [attention.q_norm, attention.k_norm]
        linears = [getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, Int8Linear) for m in linears) or not all(
            isinstance(n, cpu_kernels.FusedRMSNorm) for n in layer_norms
        ):
            return None
        kind = _activation(mlp.act_fn)
        if kind is None or activation not in (None, kind):
            return None
        activation = kind
        padding = [None] * (6 - len(layer_norms))
        tensors.append(
            [empty if n is None else n.gain for n in layer_norms + padding]
            + [t for m in linears for t in (m.packed, m.scale, empty if m.bias is None else m.bias)]
        )
        config = attention.config
        numbers.append(
            [0.0 if n is None else n.eps for n in layer_norms + padding]
            + [float(m.in_features) for m in linears]
            + [
                float(config.num_attention_heads),
                float(config.num_key_value_heads),
                float(attention.head_dim),
                float(kinds.index(step.layer_types[index] if step.rotary_by_type else None)),
                float(attention.scaling),
                float(attention.sliding_window or 0),
            ]
        )
    native = ops.NativeDecodeStep(
        tensors,
        numbers,
        final.gain,
        final.eps,
        [head.packed, head.scale, empty if head.bias is None else head.bias],
        head.in_features,
        step.sandwich,
        activation,
    )
    # What a layer that holds nothing yet is shaped like (its first keys and values come from the C++ step).
    templates = [
        torch.empty(1, layer.self_attn.config.num_key_value_heads, 0, layer.self_attn.head_dim) for layer in step.layers
    ]
    return native, kinds, templates


def _activation(module) -> str | None:
    """The MLP activation as decode_step.cpp names it, when it is exactly the ATen call that runs there."""
    import functools

    import torch.nn.functional as F

    name = type(module).__name__
    if name == "SiLUActivation" or isinstance(module, torch.nn.SiLU):
        return "silu"
    act = getattr(module, "act", None)
    if name == "GELUTanh" and isinstance(act, functools.partial) and act.func is F.gelu:
        return "gelu_tanh" if act.keywords == {"approximate": "tanh"} else None
    return None


def _text_decoder(model):
    """The decoder stack that reads text: the model's own, or an image-text-to-text model's language model."""
    decoder = getattr(model, "model", None)
    return getattr(decoder, "language_model", decoder)
