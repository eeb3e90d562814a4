"""int8 on CPU (int8 weights per channel, int8 activations per block of 32): the kernel's rows do not depend on
each other, and a model keeps its answers."""

from __future__ import annotations

import os

import pytest
import torch

from llm_backends import cpu_kernels, int8_weights, load_model

pytestmark = pytest.mark.skipif(
    not int8_weights.available() and not os.environ.get("CI"), reason="needs a C++ compiler to build the kernel"
)


def dequantized(packed, scale, n, k):
    return cpu_kernels.ops().rows(packed, torch.arange(n), k).double() * scale.double().unsqueeze(1)


def block_quantized(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x as the kernel reads it: each row's blocks of 32 features rounded to 255 levels of the block's largest."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.double(), (0, -k % block)).unflatten(-1, (-1, block))
    step = padded.abs().amax(-1, keepdim=True) / 127
    rounded = torch.round(padded / torch.where(step > 0, step, torch.ones_like(step))) * step
    return rounded.flatten(-2)[..., :k]


@pytest.mark.parametrize("n, k", [(5, 7), (37, 64), (70, 13), (1000, 96), (40, 640)])
def test_a_row_gets_the_same_bits_alone_or_batched_with_any_other_rows(n, k):
    torch.manual_seed(n * k)
    weight, bias = torch.randn(n, k), torch.randn(n)
    packed, scale = cpu_kernels.ops().pack(weight)
    x = torch.randn(13, k)
    together = cpu_kernels.ops().linear(x, packed, scale, bias, k)
    for rows in ([0], [3, 4], list(range(7)), [12, 0, 5]):
        alone = cpu_kernels.ops().linear(x[rows], packed, scale, bias, k)
        assert torch.equal(alone, together[rows])
    reference = block_quantized(x) @ dequantized(packed, scale, n, k).T + bias.double()
    assert torch.allclose(together.double(), reference, atol=1e-4)
    exact = x.double() @ weight.double().T + bias.double()
    assert (together.double() - exact).abs().max() < 0.05 * exact.abs().max()  # the rounding costs a few percent


def test_quantized_weights_are_within_half_a_step_of_the_originals():
    weight = torch.randn(70, 33) * torch.logspace(-3, 1, 70).unsqueeze(1)  # channels of very different sizes
    packed, scale = cpu_kernels.ops().pack(weight)
    error = (dequantized(packed, scale, 70, 33) - weight.double()).abs()
    assert (error <= scale.double().unsqueeze(1) / 2 + 1e-9).all()


def test_a_tied_embedding_reads_the_heads_int8_rows(qwen3_dir, gemma3_dir):
    net = load_model(str(qwen3_dir), quantization="int8", max_cache_bytes=2**26).model  # tied
    head, embedding = net.get_output_embeddings(), net.get_input_embeddings()
    assert isinstance(head, int8_weights.Int8Linear) and isinstance(embedding, int8_weights.TiedEmbeddingInt8)
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(embedding(ids), head.weight_rows(ids))
    untied = load_model(str(gemma3_dir), quantization="int8", max_cache_bytes=2**26).model
    assert not isinstance(untied.get_input_embeddings(), int8_weights.TiedEmbeddingInt8)
    with pytest.raises(ValueError, match="float32"):
        load_model(str(gemma3_dir), quantization="int8", dtype="bfloat16")


def test_int8_quarters_the_bytes_and_keeps_full_precisions_next_token_guesses(gemma3_dir, qwen3_dir):
    from tiny_models import CORPUS

    for folder in (gemma3_dir, qwen3_dir):
        int8 = load_model(str(folder), quantization="int8", max_cache_bytes=2**26)
        full = load_model(str(folder), quantization="none", max_cache_bytes=2**26)
        small, big = (m.get_model_info()["memory_footprint_bytes"] for m in (int8, full))
        assert small < 0.35 * big, (small, big)
        assert int8.get_model_info()["parameters"] == full.get_model_info()["parameters"]
        ids = torch.tensor([int8.tokenizer(" ".join(CORPUS[:6]))["input_ids"]])
        with torch.inference_mode():
            guesses = [m.model(input_ids=ids).logits[0].argmax(-1) for m in (int8, full)]
        assert (guesses[0] == guesses[1]).float().mean() >= 0.9  # teacher-forced: 100% and 96% when written


def test_a_second_load_maps_the_stored_int8_model_and_answers_the_same(gemma3_dir, tmp_path, monkeypatch, caplog):
    import transformers

    monkeypatch.setenv("LLM_CHAT_CACHE", str(tmp_path))
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    first = load_model(str(gemma3_dir), quantization="int8", max_cache_bytes=2**26)
    stored = list((tmp_path / "packed").glob("*.int8.pt"))
    assert len(stored) == 1

    def no_checkpoint_read(*args, **kwargs):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_checkpoint_read)
    second = load_model(str(gemma3_dir), quantization="int8", max_cache_bytes=2**26)
    assert second.get_model_info() == first.get_model_info()
    answers = [
        m.create(messages=messages, temperature=0, max_tokens=12)["choices"][0]["message"] for m in (first, second)
    ]
    assert answers[0] == answers[1]
    monkeypatch.undo()

    monkeypatch.setenv("LLM_CHAT_CACHE", str(tmp_path))
    stored[0].write_bytes(b"not a model")  # damaged: ignored with a log line, packed again
    third = load_model(str(gemma3_dir), quantization="int8", max_cache_bytes=2**26)
    assert "ignoring the stored packed model" in caplog.text
    assert third.create(messages=messages, temperature=0, max_tokens=12)["choices"][0]["message"] == answers[0]
    assert stored[0].stat().st_size > 1000, "stored again"


def test_the_kernel_refuses_weights_and_scales_that_do_not_match():
    packed, scale = cpu_kernels.ops().pack(torch.randn(40, 16))
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="panels"):
        cpu_kernels.ops().linear(x, packed, scale[:8], None, 16)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_kernels.ops().linear(x, packed, scale, torch.randn(3), 16)
    with pytest.raises(RuntimeError, match="features"):
        cpu_kernels.ops().linear(torch.randn(2, 15), packed, scale, None, 16)
    with pytest.raises(RuntimeError, match="features"):
        cpu_kernels.ops().linear(x, packed, scale, None, 40)


def test_the_kernel_built_without_vnni_gives_the_same_integers_and_keeps_rows_apart():
    import platform

    from torch.utils.cpp_extension import load

    # The path CPUs without VNNI take (most AVX2 laptops and servers before 2019), built here on purpose; on
    # another architecture, its portable loop.
    x86 = platform.machine() in ("x86_64", "AMD64")
    avx2 = load(
        name=f"llm_chat_cpu_ops_{'avx2' if x86 else 'portable'}_{cpu_kernels._cpu_signature()}",
        sources=[str(path) for path in cpu_kernels.SOURCES],
        extra_cflags=["-O3", *(["-march=x86-64-v3"] if x86 else []), "-ffp-contract=off", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    native = cpu_kernels.ops()
    torch.manual_seed(3)
    for n, k in ((70, 13), (40, 640)):
        weight, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(9, k)
        packed, scale = native.pack(weight)
        ours = avx2.linear(x, packed, scale, bias, k)
        for mine, theirs in zip(avx2.quantize(x), native.quantize(x), strict=True):
            assert torch.equal(mine, theirs)  # the activations' bytes and scales: the same on every path
        assert torch.allclose(ours, native.linear(x, packed, scale, bias, k), atol=1e-4)
        for rows in ([0], [2, 7], [8, 1, 4]):
            assert torch.equal(avx2.linear(x[rows], packed, scale, bias, k), ours[rows])


def test_kernels_called_from_several_threads_at_once_give_the_values_of_a_call_alone():
    """The kernels' loops run on a pool of threads of their own, the caller included; a call that finds the
    pool busy (another model's thread) runs its loop itself. Either way a row's values are those of a call
    alone, with any thread count."""
    import threading

    ops = cpu_kernels.ops()
    torch.manual_seed(11)
    n, k, heads, dim = 2048, 640, 4, 64  # enough panels and heads to be split among threads
    packed, scale = ops.pack(torch.randn(n, k))
    bias, gain = torch.randn(n), torch.rand(k) + 0.5
    xs = [torch.randn(8, k) for _ in range(4)]
    keys = [[torch.randn(1, 1, 20 + 7 * i, dim) for i in range(8)] for _ in xs]
    values = [[torch.randn_like(key) for key in row] for row in keys]
    queries = [torch.randn(8, heads, dim) for _ in xs]

    def compute(i: int) -> list[torch.Tensor]:
        return [
            ops.linear(xs[i], packed, scale, bias, k),
            ops.rms_norm(xs[i], gain, 1e-6),
            ops.decode_attention(queries[i], keys[i], values[i], 0.125),
        ]

    alone = [compute(i) for i in range(len(xs))]
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 4, 2):  # none of the pool's workers, then more of them, then fewer than it has
            torch.set_num_threads(threads)
            assert all(torch.equal(a, b) for i in range(len(xs)) for a, b in zip(compute(i), alone[i], strict=True))
    finally:
        torch.set_num_threads(threads_before)
    differ = []

    def repeat(i: int) -> None:
        for _ in range(30):
            if not all(torch.equal(a, b) for a, b in zip(compute(i), alone[i], strict=True)):
                differ.append(i)

    workers = [threading.Thread(target=repeat, args=(i,)) for i in range(len(xs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert differ == []


def test_activations_are_rounded_as_the_formula_says_in_every_path():
    """The vector paths of the activation rounding give the bytes of the formula (ties to even, a block of zeros
    rounds to zeros, a last block shorter than 32 features goes through the scalar loop)."""
    torch.manual_seed(5)
    for k in (640, 45, 32, 7):
        x = torch.randn(6, k) * torch.logspace(-4, 3, 6).unsqueeze(1)
        x[1, : min(k, 32)] = 0.0
        x[2, :3] = torch.tensor([127.0, 2.5, -3.5])[: min(k, 3)]  # exact halves: 2.5 -> 2, -3.5 -> -4
        values, scales = cpu_kernels.ops().quantize(x)
        padded = torch.nn.functional.pad(x, (0, -k % 32)).unflatten(-1, (-1, 32))
        largest = padded.abs().amax(-1, keepdim=True)
        inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
        expected = torch.round(padded * inverse).clamp(-127, 127).to(torch.int8).flatten(-2)
        assert torch.equal(values, expected)
        assert torch.equal(scales, (largest / 127.0).squeeze(-1))


def test_a_shared_steps_greedy_picks_are_torchs_argmax_of_each_row():
    """The lead of a shared step picks every greedy session's token in one call: torch.argmax's answer for each
    row (the first of equal values, a NaN counting as the largest), across the kernel's 16,384-value segments."""
    torch.manual_seed(2)
    values = torch.randn(7, 40000)
    values[1, 20000] = values[1, 30000] = 50.0  # a tie in two segments: the first
    values[2, 5] = values[2, 39999] = 50.0  # a tie within the first segment and the last
    values[3, 35000] = float("nan")  # a NaN in a late segment beats everything before it
    values[4, 100] = values[4, 30000] = float("nan")
    values[5] = float("-inf")
    values[6, 16384] = 9.0  # the first value of the second segment
    assert cpu_kernels.argmax_rows(values) == values.argmax(-1).tolist()
    assert cpu_kernels.argmax_rows(values[:, :13]) == values[:, :13].argmax(-1).tolist()
    assert [cpu_kernels.ops().argmax(row.contiguous()) for row in values] == values.argmax(-1).tolist()


def test_the_samplers_top_k_is_torchs_with_equal_values_in_index_order():
    """A sampled step's top-k by the kernel: torch.topk's values, largest first, equal values by index (a rounded
    row has many ties; a masked row, as constrained decoding leaves it, mostly -inf); a NaN goes to torch."""
    torch.manual_seed(3)
    rows = [torch.randn(262_144) * 3, (torch.randn(5_000) * 2).round(), torch.randn(40) * 0 + 1.0]
    masked = torch.full((70_000,), float("-inf"))
    masked[torch.randperm(70_000)[:10]] = torch.randn(10)
    for row in [*rows, masked]:
        for k in {min(k, row.numel()) for k in (1, 3, 64, 300)}:
            values, ids = cpu_kernels.topk(row, k)
            assert torch.equal(values, torch.topk(row, k).values) and torch.equal(row[ids], values)
            order = sorted(range(row.numel()), key=lambda j: (-row[j].item(), j))[:k] if row.numel() <= 5_000 else None
            assert order is None or ids.tolist() == order
    for where in (0, 7, 40, 99):  # among the first k, in a 16-value block, in the tail
        with_nan = torch.randn(100)
        with_nan[where] = float("nan")
        assert cpu_kernels.ops().topk(with_nan, 3)[0].numel() == 0, "the kernel hands a NaN row back"
        values, ids = cpu_kernels.topk(with_nan, 3)
        assert ids[0] == where and torch.equal(ids, torch.topk(with_nan, 3).indices)
