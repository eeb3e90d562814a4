"""The decode step on CUDA: the written-out layers of ``decode_step.py`` with attention and cache writes by the
Triton kernels of ``cuda_kernels.py``, replayed as one CUDA graph per batch size.

Sessions keep their own cache buffers (``kv_layers``); the graph finds them through a table of addresses that
is copied in before each replay, so a graph is captured once per batch-size bucket (1, 2, 4, 8, 16 rows) and
serves every later step, whatever the sessions and however long their caches. A step is then one replay
instead of ~1,400 kernel launches from Python.

Two modes:
- default: every module as it likes to run (cuBLAS picks its kernels by the number of rows, bitsandbytes' NF4
  runs a gemv for one row), so a session's logits drift in the last bits with the rows beside it and between
  a prefill and a decode step (measured in docs/benchmarks/gpu/).
- ``exact``: every module sees the same shape, always: tokens go through in tiles of ``TILE`` rows, padded,
  prompts included (they are read by this step too, tile by tile, instead of transformers' forward), and
  attention computes each token alone over position-aligned key blocks. A token's logits, keys and values
  are then bitwise the same whichever sessions share its tile and however its prompt was cut into pieces.
  It costs the padded rows' arithmetic and, for NF4, a dequantized weight per call (bitsandbytes' one-row
  gemv sums in another order than its many-row path).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from . import cuda_kernels, kv_layers
from .decode_step import DecodeStep

TILE = 64  # rows per call in the exact mode
BUCKETS = (1, 2, 4, 8, 16)  # batch sizes a decode graph is captured for (a step pads up to the next)


class CudaStep(DecodeStep):
    """``feed(caches, pieces, positions, wanted)`` as the C++ step's: pieces of any length, cache writes only
    into spare room, so a failure leaves every cache as it was. Call with one token per session to decode."""

    def __init__(self, model, *, exact: bool = False, graphs: bool = True):
        super().__init__(model, fused_attention=False, native=False)
        self.exact = exact
        self.native = "cuda"  # feed() takes pieces and changes no cache when it fails (TorchRunner relies on it)
        dtype = self.decoder.embed_tokens.weight.dtype
        shapes = [(layer.self_attn.config.num_key_value_heads, layer.self_attn.head_dim) for layer in self.layers]
        self.templates = [torch.empty(1, h, 0, d, dtype=dtype, device=self.device) for h, d in shapes]
        # Where padding rows write and read: a small buffer per layer, never a session's.
        self._scratch = [
            (
                torch.zeros(1, h, TILE, d, dtype=dtype, device=self.device),
                torch.zeros(1, h, TILE, d, dtype=dtype, device=self.device),
            )
            for h, d in shapes
        ]
        self.scratch_row = [[k.data_ptr(), v.data_ptr(), TILE, 0, 0] for k, v in self._scratch]
        # RMSNorms and the rotary embedding in one kernel each (transformers' run ~8 and ~5): a decode step of a
        # small model is mostly kernel launches, even replayed from a graph.
        self._norms = {}
        for module in self.decoder.modules():
            name = type(module).__name__
            if name in ("Gemma3RMSNorm", "Qwen3RMSNorm"):
                eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
                self._norms[id(module)] = (module.weight, eps, name == "Gemma3RMSNorm")
        self.fused_rope = self.rotate.__module__.split(".")[-1] in ("modeling_gemma3", "modeling_qwen3")
        self.use_graphs = graphs and self.device.type == "cuda"
        self.graphs: dict[int, SimpleNamespace] = {}
        self._pool = None

    @classmethod
    def for_model(cls, model, **options) -> CudaStep | None:
        """The step for ``model``, or None where it is not a text decoder this step knows or Triton is missing."""
        if not cuda_kernels.available():
            return None
        step = super().for_model(model, **options)
        if step is None or getattr(step.layers[0].self_attn, "attn_logit_softcapping", None) is not None:
            return None
        return step

    @torch.inference_mode()
    def __call__(self, caches: Sequence, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        return self.feed(caches, [[t] for t in tokens], positions, range(len(tokens)))

    @torch.inference_mode()
    def feed(
        self, caches: Sequence, pieces: Sequence[Sequence[int]], positions: Sequence[int], wanted: Sequence[int]
    ) -> torch.Tensor:
        counts = [len(piece) for piece in pieces]
        slots = kv_layers.decode_slots(caches, counts, self.templates)
        if slots is None:
            raise RuntimeError("a cache layer of a kind the CUDA step cannot write into")
        keys, values, places = slots
        rows = len(caches)
        meta = []
        for layer, template in enumerate(self.templates):
            table = []
            for row in range(rows):
                at = layer * rows + row
                buffer = keys[at]
                # The kernels address [1, kv_heads, room, head_dim] in the model's dtype: anything else would
                # be written past its end.
                if (
                    buffer.dtype != template.dtype
                    or not buffer.is_contiguous()
                    or buffer.shape[:2] != template.shape[:2]
                ):
                    raise RuntimeError(f"a cache buffer shaped {tuple(buffer.shape)} ({buffer.dtype}) in layer {layer}")
                start, write = places[2 * at], places[2 * at + 1]
                position = positions[row]
                table.append(
                    [
                        buffer.data_ptr(),
                        values[at].data_ptr(),
                        buffer.shape[-2],
                        position - write,
                        position - (write - start),
                    ]
                )
            meta.append(table)
        wanted = list(wanted)
        if self.use_graphs and all(n == 1 for n in counts) and wanted == list(range(rows)) and rows <= BUCKETS[-1]:
            graph = self._replay([p[0] for p in pieces], positions, meta)
            logits = graph.logits[:rows].clone()  # before the ledger moves: a failure here changes no cache
            self._decoded(caches, counts)  # while the GPU runs the step
            return logits
        ids = [t for piece in pieces for t in piece]
        places_t = [p + j for p, n in zip(positions, counts, strict=True) for j in range(n)]
        token_rows = [row for row, n in enumerate(counts) for _ in range(n)]
        last = list(itertools.accumulate(counts))
        ends = [last[i] - 1 for i in wanted]
        for layer in range(len(self.layers)):
            meta[layer].append(self.scratch_row[layer])
        logits = self._run(
            self._tensor(ids), self._tensor(places_t), self._tensor(token_rows), self._tensor(meta), ends
        )
        self._decoded(caches, counts)
        return logits

    @staticmethod
    def _decoded(caches: Sequence, counts: Sequence[int]) -> None:
        for cache, n in zip(caches, counts, strict=True):
            for layer in cache.layers:
                layer.decoded(n)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=False)

    def _run(self, ids, positions, rows, meta, ends: Sequence[int] | None) -> torch.Tensor:
        """Logits of the tokens at ``ends`` (indices; None: every token) after feeding every token; ``rows[t]``
        is token t's session, the last row of ``meta`` the scratch row padding tokens use. With ``ends`` None
        it copies nothing from the host, as a graph capture needs."""
        if not self.exact:
            hidden = self._layers(ids, positions, rows, meta)
            return self._head(hidden if ends is None else hidden[:, self._index(ends)])
        scratch = meta.shape[1] - 1
        wanted_order = ends
        if ends is not None:  # tiles are walked in token order; the rows go back to the order asked for below
            ends = sorted(ends)
        picked = []
        for first in range(0, len(ids), TILE):
            n = min(TILE, len(ids) - first)
            pad = TILE - n
            part = slice(first, first + n)
            hidden = self._layers(
                _padded(ids[part], pad, 0),
                _padded(positions[part], pad, None),
                _padded(rows[part], pad, scratch),
                meta,
            )
            if ends is None:
                picked.append(hidden[0, :n])
                continue
            inside = [e - first for e in ends if first <= e < first + n]
            if inside:
                picked.append(hidden[0, self._index(inside)])
        if not picked:
            return torch.empty(0, device=self.device)
        hidden = torch.cat(picked)
        logits = []
        for first in range(0, hidden.shape[0], TILE):
            part = hidden[first : first + TILE]
            pad = TILE - part.shape[0]
            tile = torch.cat([part, part.new_zeros(pad, part.shape[1])]) if pad else part
            logits.append(self._head(tile[None])[: part.shape[0]])
        logits = torch.cat(logits)
        if wanted_order is not None and list(wanted_order) != ends:
            logits = logits[self._index([ends.index(e) for e in wanted_order])]
        return logits

    def _index(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor(indices, dtype=torch.long).to(self.device)

    def _layers(self, ids, positions, rows, meta) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(ids[None])
        rotations = self._positions(hidden, positions[None])
        for index, layer in enumerate(self.layers):
            kind = self.layer_types[index] if self.rotary_by_type else None
            hidden = self._layer(layer, hidden, rotations[kind], (rows, positions, meta[index]))
        return hidden

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self._norm(self.decoder.norm, hidden))[0]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _norm(self, module, hidden: torch.Tensor) -> torch.Tensor:
        """``module(hidden)`` for an RMSNorm, in one kernel where it is Gemma 3's or Qwen 3's."""
        known = self._norms.get(id(module))
        if known is None:
            return module(hidden)
        return cuda_kernels.rms_norm(hidden, *known)

    def _layer(self, layer, hidden: torch.Tensor, rotation, where) -> torch.Tensor:
        residual = hidden
        hidden = self._attention(layer.self_attn, self._norm(layer.input_layernorm, hidden), rotation, where)
        if self.sandwich:
            hidden = residual + self._norm(layer.post_attention_layernorm, hidden)
            residual = hidden
            hidden = layer.mlp(self._norm(layer.pre_feedforward_layernorm, hidden))
            hidden = self._norm(layer.post_feedforward_layernorm, hidden)
        else:
            hidden = residual + hidden
            residual = hidden
            hidden = layer.mlp(self._norm(layer.post_attention_layernorm, hidden))
        return residual + hidden

    def _attention(self, attention, hidden: torch.Tensor, rotation, where) -> torch.Tensor:
        rows, positions, meta = where
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        # Normalised per head vector, before or after moving the head dimension: the same numbers either way.
        query = self._norm(attention.q_norm, attention.q_proj(hidden).view(shape))
        key = self._norm(attention.k_norm, attention.k_proj(hidden).view(shape))
        cos, sin = rotation
        if self.fused_rope:
            query = cuda_kernels.rope(query, cos, sin).transpose(1, 2)
            key = cuda_kernels.rope(key, cos, sin).transpose(1, 2)
        else:
            query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        cuda_kernels.write_kv(key, value, rows, positions, meta)
        out = cuda_kernels.attend(
            query, key.shape[1], rows, positions, meta, attention.scaling, attention.sliding_window
        )
        return attention.o_proj(out[None])

    def _replay(self, tokens: Sequence[int], positions: Sequence[int], meta: list) -> SimpleNamespace:
        """Launches one decode step through the captured graph of the smallest bucket that holds these rows;
        its ``logits`` hold the result once the GPU is done (until the next replay)."""
        rows = len(tokens)
        size = TILE if self.exact else next(b for b in BUCKETS if b >= rows)
        graph = self.graphs.get(size) or self._capture(size)
        pad = size - rows
        table = [layer + [self.scratch_row[i]] * (pad + 1) for i, layer in enumerate(meta)]
        graph.ids.copy_(torch.tensor(list(tokens) + [0] * pad))
        graph.positions.copy_(torch.tensor(list(positions) + [0] * pad))
        graph.meta.copy_(torch.tensor(table, dtype=torch.long))
        graph.graph.replay()
        return graph

    def capture_all(self) -> None:
        """Captures every bucket's graph now (at load), so no capture happens while sessions are served: during a
        capture, another thread's GPU work (sampling, a cache copy) would break it."""
        if self.use_graphs:
            for size in (TILE,) if self.exact else BUCKETS:
                if size not in self.graphs:
                    self._capture(size)

    def _capture(self, size: int) -> SimpleNamespace:
        """Captures the step for ``size`` rows (every row reading and writing the scratch buffers meanwhile)."""
        table = [[self.scratch_row[i]] * (size + 1) for i in range(len(self.layers))]
        graph = SimpleNamespace(
            ids=torch.zeros(size, dtype=torch.long, device=self.device),
            positions=torch.zeros(size, dtype=torch.long, device=self.device),
            rows=torch.arange(size, device=self.device),
            meta=torch.tensor(table, dtype=torch.long, device=self.device),
            graph=torch.cuda.CUDAGraph(),
        )
        ends = None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS and bitsandbytes set up their work space
            for _ in range(2):
                self._run(graph.ids, graph.positions, graph.rows, graph.meta, ends)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph.graph, pool=self._pool):
            graph.logits = self._run(graph.ids, graph.positions, graph.rows, graph.meta, ends)
        self.graphs[size] = graph
        return graph


def _padded(values: torch.Tensor, pad: int, fill: int | None) -> torch.Tensor:
    """``values`` with ``pad`` more entries: ``fill``, or 0, 1, 2, ... (positions in the scratch buffer)."""
    if not pad:
        return values
    extra = torch.arange(pad, device=values.device) if fill is None else values.new_full((pad,), fill)
    return torch.cat([values, extra.to(values.dtype)])
