"""The CUDA decode step (cuda_step.py) and its exact mode.

On a CPU the Triton kernels run in Triton's interpreter (fp32), which checks their arithmetic and the step's
bookkeeping; on a CUDA machine (run by hand: CI has no GPU) the same tests run the compiled kernels in bf16 and
NF4, and the graph tests replay captured CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CI
from llm_backends import cuda_kernels, kv_layers
from llm_backends.cuda_step import TILE, CudaStep
from llm_backends.decode_step import DecodeStep

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on a CPU the kernels run in Triton's interpreter (conftest.py)
# Triton comes with torch on Linux; in CI its absence fails these tests rather than skipping them.
pytestmark = pytest.mark.skipif(not cuda_kernels.available() and not CI, reason="Triton is not installed")


@pytest.fixture(scope="module", params=["gemma3", "qwen3"])
def tiny(request, gemma3_dir, qwen3_dir):
    folder = {"gemma3": gemma3_dir, "qwen3": qwen3_dir}[request.param]
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE).eval()


def _prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n,), generator=generator).tolist() for n in lengths]


def _caches(model, n):
    return [kv_layers.new_cache(model.config) for _ in range(n)]


def test_the_cuda_step_gives_the_logits_of_the_written_out_step(tiny):
    """Prompts fed as pieces (several sessions in one call), then decode steps past Gemma's sliding window,
    against transformers' forward and the written-out step, fp32."""
    reference = DecodeStep(tiny, fused_attention=False, native=False)
    step = CudaStep(tiny, graphs=False)
    prompts = _prompts([7, 30])
    ours, theirs = _caches(tiny, 2), _caches(tiny, 2)
    with torch.inference_mode():
        for cache, prompt in zip(theirs, prompts, strict=True):
            tiny(input_ids=torch.tensor([prompt], device=DEVICE), past_key_values=cache, use_cache=True)
        fed = step.feed(ours, prompts, [0, 0], [1, 0])
        whole = torch.stack([tiny(input_ids=torch.tensor([p], device=DEVICE)).logits[0, -1] for p in reversed(prompts)])
    torch.testing.assert_close(fed, whole, rtol=0, atol=1e-4)
    positions, tokens = [len(p) for p in prompts], [11, 12]
    for _ in range(25):
        expected, got = reference(theirs, tokens, positions), step(ours, tokens, positions)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        positions = [p + 1 for p in positions]
        tokens = [int(t) for t in expected.argmax(-1)]
    assert [len(c.layers[-1].keys[0, 0]) for c in ours] == [len(c.layers[-1].keys[0, 0]) for c in theirs]


def _exact_checks(model):
    step = CudaStep(model, exact=True, graphs=CUDA)
    prompt, other = _prompts([TILE + 26, 20], seed=1)
    whole, split, neighbour, longer = _caches(model, 4)
    with torch.inference_mode():
        at_once = step.feed([whole], [prompt], [0], [0])
        step.feed([split], [prompt[:37]], [0], [])
        in_two = step.feed([split], [prompt[37:]], [37], [0])
        step.feed([neighbour], [other], [0], [])
        assert torch.equal(at_once, in_two), "a prompt read whole and in two pieces"
        alone = step([whole], [7], [len(prompt)])
        together = step([split, neighbour], [7, 9], [len(prompt), len(other)])
        assert torch.equal(alone[0], together[0]), "a decode step alone and beside another session"
        read = step.feed([longer], [prompt + [7, 8]], [0], [0])
        decoded = step([whole], [8], [len(prompt) + 1])
        assert torch.equal(read[0], decoded[0]), "a token decoded and the same token read in a prompt"
    for a, b in zip(whole.layers, longer.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), "keys decoded and read differ"


def test_the_exact_mode_is_bitwise_whatever_the_split_and_the_neighbours(tiny):
    _exact_checks(tiny)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run by hand there; CI has none)")
@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_the_exact_mode_is_bitwise_on_cuda(precision, gemma3_dir, qwen3_dir):
    from llm_backends import load_model

    for folder in (gemma3_dir, qwen3_dir):
        quantization = "nf4" if precision == "nf4" else "none"
        chat = load_model(str(folder), device="cuda", dtype="bfloat16", quantization=quantization, exact=True)
        _exact_checks(chat.model)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run by hand there; CI has none)")
def test_a_replayed_graph_gives_the_eager_steps_logits(tiny):
    model = tiny.to(dtype=torch.bfloat16)
    graphs, eager = CudaStep(model), CudaStep(model, graphs=False)
    prompts = _prompts([9, 40, 3])
    ours, theirs = _caches(model, 3), _caches(model, 3)
    with torch.inference_mode():
        for step, caches in ((graphs, ours), (eager, theirs)):
            step.feed(caches, prompts, [0, 0, 0], [])
        positions, tokens = [len(p) for p in prompts], [11, 12, 13]
        for n in (3, 1, 2, 3):  # buckets of 4, 1, 2 and 4 again: each graph replayed with other buffers
            expected = eager(theirs[:n], tokens[:n], positions[:n])
            got = graphs(ours[:n], tokens[:n], positions[:n])
            assert torch.equal(got, expected)
            positions = [p + 1 for p in positions[:n]] + positions[n:]
    assert sorted(graphs.graphs) == [1, 2, 4]
    tiny.to(dtype=torch.float32)


def test_a_failed_step_changes_no_cache(tiny, monkeypatch):
    step = CudaStep(tiny, graphs=False)
    (cache,) = _caches(tiny, 1)
    with torch.inference_mode():
        step.feed([cache], _prompts([12]), [0], [])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cuda_kernels, "attend", broken)
    with pytest.raises(RuntimeError, match="out of memory"), torch.inference_mode():
        step([cache], [5], [12])
    for layer, (keys, values) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_the_exact_mode_returns_rows_in_the_order_asked_for(tiny):
    """Wanted rows whose last tokens fall in different tiles come back in the order asked for."""
    step = CudaStep.for_model(tiny, exact=True, graphs=False)
    prompts = _prompts([10, TILE + 6], seed=2)
    first, second = _caches(tiny, 2), _caches(tiny, 2)
    with torch.inference_mode():
        ascending = step.feed(first, prompts, [0, 0], [0, 1])
        descending = step.feed(second, prompts, [0, 0], [1, 0])
    assert torch.equal(descending, ascending.flip(0))


def test_the_exact_mode_changes_nothing_on_a_cpu(gemma3_dir):
    from llm_backends import load_model

    plain, exact = (load_model(str(gemma3_dir), device="cpu", exact=e, max_cache_bytes=2**26) for e in (False, True))
    assert type(exact.engine.runner.step) is type(plain.engine.runner.step) is DecodeStep
    assert not exact.engine.runner.exact
    assert (exact.engine.runner.step.native is None) == (plain.engine.runner.step.native is None)
