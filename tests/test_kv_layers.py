"""KV layers that grow in place give what transformers' concatenating layers give, without a copy per token."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from llm_backends.kv_layers import GrowingLayer, GrowingSlidingLayer


def states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)


def test_growing_layers_return_what_transformers_layers_return():
    pairs = [(DynamicLayer(), GrowingLayer()), (DynamicSlidingWindowLayer(8), GrowingSlidingLayer(8))]
    for theirs, ours in pairs:
        for step, n in enumerate([5, 1, 1, 2, 1, 9, 1, 1, 1, 70, 1, 1]):
            k, v = states(n, step)
            expected, got = theirs.update(k, v), ours.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
            assert torch.equal(theirs.keys, ours.keys) and torch.equal(theirs.values, ours.values)
            assert theirs.get_seq_length() == ours.get_seq_length()


def test_cropping_below_the_window_then_growing_matches_transformers():
    for theirs, ours in [(DynamicLayer(), GrowingLayer()), (DynamicSlidingWindowLayer(16), GrowingSlidingLayer(16))]:
        for layer in (theirs, ours):
            layer.update(*states(6, 0))
            layer.crop(-2)
            layer.update(*states(3, 1))
        assert torch.equal(theirs.keys, ours.keys) and torch.equal(theirs.values, ours.values)
        assert theirs.get_seq_length() == ours.get_seq_length() == 7


def test_a_decode_step_writes_into_the_cache_instead_of_copying_it(gemma3):
    runner = gemma3.engine.runner
    entry = runner.new_entry()
    runner.forward(entry, list(range(3, 13)))

    def buffers():
        return [layer.keys.untyped_storage().data_ptr() for layer in entry.cache.layers]

    before = buffers()
    for token in (20, 21, 22):
        runner.decode(entry, token)
    assert buffers() == before


def test_a_restore_point_is_never_written_into(gemma3):
    runner = gemma3.engine.runner
    entry = runner.new_entry()
    runner.forward(entry, list(range(3, 30)))  # past the tiny model's 16-token window
    entry.save_checkpoint(None)
    saved = [None if s is None else (s[0].clone(), s[1].clone()) for s in entry.checkpoints[-1].states]
    for token in (40, 41):
        runner.decode(entry, token)
    entry.rewind_to(27)
    for token in (50, 51, 52):
        runner.decode(entry, token)
    for kept, now in zip(saved, entry.checkpoints[-1].states, strict=True):
        assert (kept is None and now is None) or (torch.equal(kept[0], now[0]) and torch.equal(kept[1], now[1]))


def test_a_copied_layer_holds_the_live_tokens_in_room_of_its_own():
    import copy

    full, sliding = GrowingLayer(), GrowingSlidingLayer(8)
    for step, n in enumerate([70, 1, 1]):
        full.update(*states(n, step))
        sliding.update(*states(n, step))  # keeps its last 7, in a buffer with room for 70 and more
    full.crop(-62)  # 10 left in the same buffer
    for layer in (full, sliding):
        twin = copy.deepcopy(layer)
        assert torch.equal(twin.keys, layer.keys) and torch.equal(twin.values, layer.values)
        assert twin.get_seq_length() == layer.get_seq_length()
        assert twin.storage_bytes < layer.storage_bytes  # not the spare room the original had made
        k, v = states(1, 9)
        assert all(torch.equal(a, b) for a, b in zip(twin.update(k, v), layer.update(k, v), strict=True))
        assert twin.keys.untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr()


def test_a_cache_copies_and_its_windows_clone_in_one_kernel_call_to_the_same_values(monkeypatch):
    from types import SimpleNamespace

    from llm_backends import cpu_kernels, kv_layers

    kernels = cpu_kernels.ops()
    assert kernels is not None, "the CPU kernels build here (CI builds them)"
    calls = []
    copy_spans = kernels.copy_spans
    monkeypatch.setattr(kernels, "copy_spans", lambda *a: calls.append(len(a[0])) or copy_spans(*a), raising=False)

    layers = [GrowingLayer(), GrowingSlidingLayer(8), GrowingLayer(), GrowingSlidingLayer(8)]
    for step, n in enumerate([70, 1, 1]):  # two heads: each head's span is copied from its own place
        for layer in layers:
            layer.update(*states(n, step))
    layers[0].crop(-62)  # 10 left in the same buffer
    empty = GrowingLayer()  # a layer that holds nothing yet stays empty
    cache = SimpleNamespace(layers=[*layers, empty])
    twin = kv_layers.copy_cache(cache)
    windows = kv_layers.clone_windows(cache.layers)
    assert calls == [8, 4], "one call for the cache's 4 layers' keys and values, one for the 2 sliding windows"
    assert twin.layers[-1].keys is None and windows[-1] is None
    for layer, copied, window in zip(layers, twin.layers, windows, strict=False):
        assert torch.equal(copied.keys, layer.keys) and torch.equal(copied.values, layer.values)
        assert copied.get_seq_length() == layer.get_seq_length() and type(copied) is type(layer)
        assert copied.keys.untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr()
        if layer.is_sliding:
            assert torch.equal(window[0], layer.keys) and torch.equal(window[1], layer.values)
            assert window[0].untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr()
        else:
            assert window is None
        k, v = states(1, 9)
        assert all(torch.equal(a, b) for a, b in zip(copied.update(k, v), layer.update(k, v), strict=True))
