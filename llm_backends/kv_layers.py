"""KV cache layers that grow in place: a decode step writes its key and value into spare room instead of
concatenating (transformers' DynamicLayer copies the whole layer on every token, a cost that grows with the
context). The one place that subclasses transformers' cache layers.

Room is added in steps (a quarter more, at least ``STEP`` tokens), so a long reply copies the cache a few
times instead of once per token. A tensor handed in from outside (a restore point's saved window) is never
written into: the next append moves the states to room of the layer's own first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from . import cpu_kernels, session_cache

STEP = 64


def _room(tokens: int) -> int:
    return -(-(tokens + tokens // 4 + STEP) // STEP) * STEP


class _Storage:
    """Keys and values held in a buffer with spare room; ``start``/``length`` say which positions are live."""

    @property
    def keys(self):
        return self._live(self.__dict__.get("_k"))

    @keys.setter
    def keys(self, tensor):  # transformers' own code and restore points set keys, then values
        if tensor is None or tensor.dim() != 4:  # None, or transformers' empty placeholder
            self._k = self._v = None
            self._start = self._length = 0
        else:
            self._k, self._start, self._length = tensor, 0, tensor.shape[-2]
        self._owned = False

    @property
    def values(self):
        return self._live(self.__dict__.get("_v"))

    @values.setter
    def values(self, tensor):
        if tensor is not None and tensor.dim() == 4:
            self._v = tensor

    def _live(self, tensor):
        if tensor is None:
            return None
        return tensor[:, :, self._start : self._start + self._length, :]

    def _make_room(self, n: int, like_keys: torch.Tensor, like_values: torch.Tensor) -> int:
        """Room for ``n`` more tokens in the layer's own buffers; returns where they go."""
        end = self._start + self._length
        if self._k is None or not self._owned or end + n > self._k.shape[-2]:
            shape = list(like_keys.shape)
            shape[-2] = _room(self._length + n)
            # Uninitialised: only live positions are ever read (a zero fill also started OpenMP's threads).
            keys = like_keys.new_empty(shape)
            values = like_values.new_empty(shape)
            if self._length:
                keys[:, :, : self._length].copy_(self.keys)
                values[:, :, : self._length].copy_(self.values)
            self._k, self._v, self._start, self._owned = keys, values, 0, True
            end = self._length
        return end

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = key_states.shape[-2]
        end = self._make_room(n, key_states, value_states)
        self._k[:, :, end : end + n].copy_(key_states)
        self._v[:, :, end : end + n].copy_(value_states)
        self._length += n

    def decode_slot(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """For a step that writes its tokens' keys and values itself (``decode_step.cpp``): the buffers, with
        room for ``n`` more tokens, the first live position and where the tokens go; ``decoded(n)`` after.
        ``like`` ([1, heads, 0, head_dim]) gives a layer that holds nothing yet its shape and type."""
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        write = self._make_room(n, like, like)
        return self._k, self._v, self._start, write

    def _twin(self):
        """A layer like this one that holds nothing yet. The other attributes are numbers, flags, a dtype, a device
        and transformers' sliding-window tensor, which is replaced, never written into: shared, not walked (a deep
        walk of 18 layers took ~1 ms)."""
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_k", "_v")})
        new._k = new._v = None
        new._start = new._length = 0
        new._owned = False
        return new

    def _dense(self) -> bool:
        """Whether ``copy_spans`` can read the buffers (the layer's own are; a tensor handed in may not be)."""
        return self.__dict__.get("_k") is None or all(
            t.dim() == 4 and t.size(0) == 1 and t.device.type == "cpu" and t.stride(3) == 1 and t.stride(2) == t.size(3)
            for t in (self._k, self._v)
        )

    def __deepcopy__(self, memo):
        """A copy with the same live tokens in room of its own. (A plain deepcopy also copied the spare room, and
        its walk took most of a new session's checkout, under the store's lock, with several arriving at once.)"""
        new = self._twin()
        memo[id(self)] = new
        if self.__dict__.get("_k") is not None:
            keys, values, n = self.keys, self.values, self._length
            shape = list(keys.shape)
            shape[-2] = _room(n)
            new._k, new._v = keys.new_empty(shape), values.new_empty(shape)
            new._k[:, :, :n].copy_(keys)
            new._v[:, :, :n].copy_(values)
            new._length, new._owned = n, True
        return new

    @property
    def storage_bytes(self) -> int:
        if self._k is None:
            return 0
        return 2 * self._k.numel() * self._k.element_size()


class GrowingLayer(_Storage, DynamicLayer):
    """A full-attention layer: every token's key and value, appended in place."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        return self.keys, self.values

    def decoded(self, n: int) -> None:
        """The tokens of ``decode_slot(n)`` were written."""
        self._length += n

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if self.is_initialized:
            self._length = max(0, self._length + tokens_to_remove)


class GrowingSlidingLayer(_Storage, DynamicSlidingWindowLayer):
    """A sliding-window layer: keeps the last ``sliding_window - 1`` tokens; attention sees those plus the new."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.record_past:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._append(key_states, value_states)
        full = self.keys, self.values
        self._slide()
        return full

    def _slide(self) -> None:
        keep = min(self._length, self.sliding_window - 1)
        self._start += self._length - keep
        self._length = keep

    def decoded(self, n: int) -> None:
        """The tokens of ``decode_slot(n)`` were written (each attended to the window before it)."""
        self.cumulative_length += n
        self._length += n
        self._slide()

    def crop(self, tokens_to_remove: int) -> None:
        if self.cumulative_length >= self.sliding_window or tokens_to_remove > 0:
            return super().crop(tokens_to_remove)
        if self.is_initialized:
            self._length = max(0, self._length + tokens_to_remove)
            self.cumulative_length = self._length


def decode_slots(
    caches, counts: Sequence[int], templates: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None:
    """Every layer's ``decode_slot(n)`` for each cache (``counts[i]`` tokens for cache i), layer by layer (index
    layer * len(caches) + row): keys, values and (start, write) pairs flattened; ``templates[layer]`` is that
    layer's ``like``. None if a layer is not one of these (``new_cache`` makes only these; the C++ step then
    refuses the pass, having changed nothing)."""
    per_row = [cache.layers for cache in caches]
    keys, values, places = [], [], []
    for layers, like in zip(zip(*per_row, strict=True), templates, strict=True):
        for layer, n in zip(layers, counts, strict=True):
            if not isinstance(layer, _Storage) or getattr(layer, "record_past", False):
                return None
            k, v, start, write = layer.decode_slot(n, like)
            keys.append(k)
            values.append(v)
            places += (start, write)
    return keys, values, places


def _built_kernels():
    """The CPU kernels where a model already built them (this never starts a build), else None."""
    return cpu_kernels.ops() if cpu_kernels.ops.cache_info().currsize > 0 else None


def _copies(kernels, layers: Sequence[_Storage], room) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer's live tokens in new tensors with ``room(length)`` positions: one kernel call."""
    spans = kernels.copy_spans(
        [t for x in layers for t in (x._k, x._v)],
        [x._start for x in layers for _ in range(2)],
        [x._length for x in layers for _ in range(2)],
        [room(x._length) for x in layers for _ in range(2)],
    )
    return list(zip(spans[::2], spans[1::2], strict=True))


def copy_cache(cache):
    """A copy of ``cache`` whose layers hold the same live tokens in room of their own: ``new_cache``'s layers in
    one kernel call (``copy_spans``) where the CPU kernels are built, anything else by ``copy.deepcopy``."""
    kernels, layers = _built_kernels(), getattr(cache, "layers", None)
    if kernels is None or layers is None or not all(isinstance(x, _Storage) and x._dense() for x in layers):
        return copy.deepcopy(cache)
    copies = iter(_copies(kernels, [x for x in layers if x._k is not None], _room))
    new = copy.copy(cache)  # its other attributes: the class of layer to add and an offloading flag
    new.layers = []
    for layer in layers:
        twin = layer._twin()
        if layer._k is not None:
            twin._k, twin._v = next(copies)
            twin._length, twin._owned = layer._length, True
        new.layers.append(twin)
    return new


def clone_windows(layers) -> tuple:
    """A restore point's states (``session_cache.clone_windows``): each sliding layer's window copied, None for the
    other layers; in one kernel call where the CPU kernels are built and the layers are ``new_cache``'s."""
    wanted = [bool(getattr(x, "is_sliding", False)) and x.is_initialized for x in layers]
    kernels, held = _built_kernels(), [x for x, w in zip(layers, wanted, strict=True) if w]
    if kernels is None or not all(isinstance(x, _Storage) and x._k is not None and x._dense() for x in held):
        return session_cache.clone_windows(layers)
    copies = iter(_copies(kernels, held, lambda length: length))
    return tuple(next(copies) if w else None for w in wanted)


def new_cache(config) -> DynamicCache:
    """transformers' DynamicCache for ``config``, with its plain full and sliding layers growing in place."""
    cache = DynamicCache(config=config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            layer = GrowingSlidingLayer(sliding_window=layer.sliding_window)
        elif type(layer) is DynamicLayer:
            layer = GrowingLayer()
        layers.append(layer)
    cache.layers = layers
    return cache
