"""GPU decode figures (issue 16): our engine against transformers' own generate on the same model, same run.

Models are built from published configs with random weights (nothing to download), saved to a folder and loaded
through ``load_model`` as a user would. Each decodes a fixed number of tokens, ignoring end-of-sequence, after a
fixed prompt. Prints JSON lines and writes docs/benchmarks/gpu/decode.{json,md} (``--out``).

    python benchmarks/gpu.py [--models gemma3-270m,qwen3-0.6b,gemma3-4b,qwen3-8b] [--tokens 256]

Needs a CUDA GPU; ``run.py --gpu`` calls it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# 2: the peer's rate excludes its prefill and first token, and the many-session window starts once every
# session has its first token (version 1 counted both in, which flattered the peer ratio and understated ours).
HARNESS = 2
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # HBM peak by GPU name: the bandwidth limit's divisor

# Published config values (Hugging Face model cards' config.json), text decoders only.
SHAPES = {
    "gemma3-270m": dict(
        kind="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, rope_theta=1_000_000.0,
        max_position_embeddings=32768, query_pre_attn_scalar=256, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        kind="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
        max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "gemma3-4b": dict(
        kind="gemma3", vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024, rope_theta=1_000_000.0,
        max_position_embeddings=131072, query_pre_attn_scalar=256, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
    "qwen3-8b": dict(
        kind="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
        max_position_embeddings=40960, tie_word_embeddings=False,
    ),
}  # fmt: skip


def build(name: str, folder: Path, device: str = "cuda") -> Path:
    """The model ``name`` with random weights (std 0.02, as the configs' initializer_range) and a small
    tokenizer, saved to ``folder`` (built on ``device``)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from tiny_models import _gemma3_tokenizer, _tokenizer

    values = dict(SHAPES[name])
    kind = values.pop("kind")
    if kind == "gemma3":
        tokenizer = _gemma3_tokenizer()
        config = Gemma3TextConfig(**values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model_class = Gemma3ForCausalLM
    else:
        raw = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        config = Qwen3Config(**values, eos_token_id=tokenizer.eos_token_id)
        model_class = Qwen3ForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an 8B model in fp32 would need 32 GB first
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def _prompt(length: int, vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(10, min(vocab, 100_000), (length,), generator=generator).tolist()


def variant(prompt: list[int], index: int) -> list[int]:
    """Session ``index``'s prompt: each session of a batch reads a different one."""
    return [*prompt[: len(prompt) - index], 7 + index]


def ours(runner, prompt: list[int], tokens: int, sessions: int = 1, first: int = 0) -> dict:
    """Greedy decode of ``tokens`` tokens per session through our engine (prefill, then the batched decode
    loop); sessions (``variant`` first, first + 1, ...) run in threads, as the server's do. Returns the
    aggregate tok/s of the tokens that came once every session had its first token (so no prefill is in the
    window) and the ids."""
    from llm_backends.engine import Engine
    from llm_backends.request import SamplingParams

    engine = Engine(runner, stop_ids=frozenset())
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
    results: list[dict] = [None] * sessions
    start_line = threading.Barrier(sessions)

    def one(index: int) -> None:
        try:
            measure_one(index)
        except BaseException as e:
            results[index] = {"error": e}
            start_line.abort()

    def measure_one(index: int) -> None:
        entry = runner.new_entry()
        run = engine.generate(variant(prompt, first + index), entry, params)
        start_line.wait()
        ids, times, started = [], [], time.perf_counter()
        for token in run:
            ids.append(token)
            times.append(time.perf_counter())
        torch.cuda.synchronize()
        results[index] = {"ids": ids, "ttft_s": times[0] - started, "times": times}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r["error"] for r in results if "error" in r]
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))  # the cause first
    if errors:
        raise errors[0]
    window_start = max(r["times"][0] for r in results)  # every session is decoding from here on
    window_end = max(r["times"][-1] for r in results)
    counted = sum(sum(1 for t in r["times"] if t > window_start) for r in results)
    return {
        "tok_s": counted / (window_end - window_start),
        "ttft_s": max(r["ttft_s"] for r in results),
        "ids": [r["ids"] for r in results],
    }


def peer(model, prompt: list[int], tokens: int, static: bool) -> dict:
    """transformers' generate on the same model: eager with its dynamic cache, or with its static cache, which
    it compiles (mode reduce-overhead) on first use. Timed after a warm-up; its decode rate is (tokens - 1) over
    the time a ``tokens`` call takes beyond a one-token call (prefill and first token), as ours is counted."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], device="cuda")

    def timed(n: int) -> tuple[float, torch.Tensor]:
        config = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
            **({"cache_implementation": "static"} if static else {}),
        )  # fmt: skip
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(ids, generation_config=config)
        torch.cuda.synchronize()
        return time.perf_counter() - started, out

    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        warm_up, _ = timed(tokens)  # (and compilation)
        timed(1)
        one, _ = timed(1)
        elapsed, out = timed(tokens)
    finally:
        model.set_attn_implementation(before)
    return {"tok_s": (tokens - 1) / (elapsed - one), "warm_up_s": warm_up, "ids": out[0, len(prompt) :].tolist()}


def graph_ms(runner, size: int, replays: int = 50) -> float:
    """GPU time of one decode step of ``size`` rows: the captured graph replayed alone, with no host work between
    replays (every row reads and writes the scratch buffers, so attention covers a short context). A step's wall
    time beyond this is host work: the address table, copies in, sampling, the threads' hand-offs."""
    graph = runner.step.graphs[min(b for b in runner.step.graphs if b >= size)]
    graph.graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays * 1000


def weight_bytes(model) -> int:
    return int(model.get_memory_footprint())


def bytes_per_token(row: dict) -> int:
    """Weight bytes a decode step reads: all of them but an input embedding that is not also the output head
    (its rows are gathered, not read whole; it is left in bf16 by NF4). The caches' reads (under 1% at these
    lengths) are left out."""
    shape = SHAPES[row["model"]]
    untied = 0 if shape["tie_word_embeddings"] else shape["vocab_size"] * shape["hidden_size"] * 2
    return row["weight_bytes"] - untied


def bandwidth_limit(row: dict, gpu: str) -> float | None:
    """tok/s if a step only read its weights once at the GPU's peak bandwidth (None: a GPU not in the table)."""
    peak = next((v for k, v in PEAK_BYTES_PER_S.items() if k in gpu), None)
    return peak / bytes_per_token(row) if peak else None


def agreement(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / max(1, min(len(a), len(b)))


def measure(name: str, folder: Path, args) -> list[dict]:
    from llm_backends import load_model
    from llm_backends.local import restore_points
    from llm_backends.transformers_backend import TorchRunner

    rows = []
    for precision in args.precisions:
        quantization = "nf4" if precision == "nf4" else "none"
        started = time.perf_counter()
        chat = load_model(str(folder), device="cuda", dtype="bfloat16", quantization=quantization)
        load_s = time.perf_counter() - started
        model = chat.model
        prompt = _prompt(args.prompt, model.config.vocab_size)
        default = chat.engine.runner
        exact = TorchRunner(model, max_checkpoints=restore_points(0), exact=True)
        row = {"model": name, "precision": precision, "load_s": load_s, "weight_bytes": weight_bytes(model)}
        row["harness"] = HARNESS
        ours(default, prompt, 8)  # captures the one-row graph, compiles the kernels
        ours(exact, prompt, 8)
        single = ours(default, prompt, args.tokens)
        row["ours_tok_s"] = single["tok_s"]
        row["ours_ttft_s"] = single["ttft_s"]
        exact_single = ours(exact, prompt, args.tokens)
        row["exact_tok_s"] = exact_single["tok_s"]
        row["greedy_agreement_default_vs_exact"] = agreement(single["ids"][0], exact_single["ids"][0])
        for sessions in args.sessions:
            for mode, runner in (("ours", default), ("exact", exact)):
                ours(runner, prompt, 4, sessions)  # captures this bucket's graph
                many = ours(runner, prompt, args.tokens, sessions)
                row[f"{mode}_{sessions}_sessions_tok_s"] = many["tok_s"]
                # Sessions 0 and 1 of the batch against their answers alone (session i's prompt: see ours()).
                alone = [ours(runner, prompt, args.tokens, first=i)["ids"][0] for i in (0, 1)]
                row[f"{mode}_{sessions}_sessions_equal_alone_of_2"] = sum(
                    a == b for a, b in zip(alone, many["ids"][:2], strict=True)
                )
        try:  # where the time of a step goes: the graph alone against the step as the sessions see it
            for size in (1, *args.sessions):
                row[f"graph_{size}_ms"] = graph_ms(default, size)
        except Exception as e:
            row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        # Drift of the default mode: its decode-step logits against a fresh forward over the same tokens.
        row["max_abs_logit_drift"] = drift(default, model, prompt, single["ids"][0][:32])
        for label, static in (("peer_eager", False), ("peer_static_compiled", True)):
            if args.no_peer or (static and (precision == "nf4" or name not in args.compiled_peer)):
                continue
            try:
                result = peer(model, prompt, args.peer_tokens, static)
                row[f"{label}_tok_s"] = result["tok_s"]
                row[f"{label}_warm_up_s"] = result["warm_up_s"]
            except Exception as e:  # the peer's own failure is a figure too
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if args.long and precision == "bf16":
            row.update(long_prompt(default, exact, model, args.long))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del chat, model, default, exact
        gc.collect()
        torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def drift(runner, model, prompt: list[int], completion: list[int]) -> float:
    entry = runner.new_entry()
    logits = [runner.forward(entry, prompt)]
    for token in completion[:-1]:
        logits.append(runner.decode(entry, token)[0])
    fresh = model(input_ids=torch.tensor([prompt + completion[:-1]], device="cuda")).logits[0, len(prompt) - 1 :]
    return float((torch.stack(logits).float() - fresh.float()).abs().max())


def long_prompt(default, exact, model, length: int) -> dict:
    """Prefill of a ``length``-token prompt: seconds and peak CUDA memory above the weights."""
    out = {}
    prompt = _prompt(length, model.config.vocab_size)
    for label, runner in (("default", default), ("exact", exact)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        entry = runner.new_entry()
        started = time.perf_counter()
        try:
            from llm_backends.engine import Engine

            Engine(runner, stop_ids=frozenset()).prefill(entry, prompt)
            torch.cuda.synchronize()
            out[f"long_{length}_{label}_prefill_s"] = time.perf_counter() - started
            out[f"long_{length}_{label}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except Exception as e:
            out[f"long_{length}_{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        del entry
        torch.cuda.empty_cache()
    return out


def write(rows: list[dict], out: Path, facts: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    facts = facts or {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for r in rows:
        r["bytes_per_token"] = bytes_per_token(r)
        r["bandwidth_limit_tok_s"] = bandwidth_limit(r, facts["gpu"]) or float("nan")
    (out / "decode.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    lines = [
        f"GPU: {facts['gpu']}, torch {facts['torch']}. Random weights, published shapes; greedy, end-of-sequence "
        "ignored. tok/s after the first token.",
        "",
    ]
    if any(r.get("harness", 1) < HARNESS for r in rows):
        lines += [
            "Measured with the first version of this harness: there the peer's tok/s includes its prefill of the "
            "prompt and its first token (so 'ours / peer' is flattered), and the many-session figures include "
            "the other sessions' prefills (so they are understated).",
            "",
        ]
    lines += [
        "| model | precision | ours (default) | ours (exact) | exact / default | peer eager | peer static+compile "
        "| ours / peer compiled | bandwidth limit | ours / limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiled = r.get("peer_static_compiled_tok_s")
        eager = r.get("peer_eager_tok_s")
        peer = f"{compiled:.0f} | {r['ours_tok_s'] / compiled:.2f}" if compiled else "– | –"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['ours_tok_s']:.0f} | {r['exact_tok_s']:.0f} | "
            f"{r['exact_tok_s'] / r['ours_tok_s']:.2f} | {f'{eager:.0f}' if eager else '–'} | {peer} | "
            f"{r['bandwidth_limit_tok_s']:.0f} | {r['ours_tok_s'] / r['bandwidth_limit_tok_s']:.2f} |"
        )
    lines += [
        "",
        "Sessions decoding at once (aggregate tok/s), the greedy answers of two of them against their answers "
        "alone, and the default mode's drift (max |logit difference| of its decode steps against one fresh "
        "forward over the same tokens):",
        "",
        "| model | precision | sessions | default tok/s | exact tok/s | default: equal alone | exact: equal alone "
        "| drift (default) | agreement default vs exact (greedy, single stream) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key in (k for k in r if k.startswith("ours_") and k.endswith("_sessions_tok_s")):
            n = key.split("_")[1]
            exact = r.get(f"exact_{n}_sessions_tok_s", 0)
            equal = [r.get(f"{mode}_{n}_sessions_equal_alone_of_2") for mode in ("ours", "exact")]
            lines.append(
                f"| {r['model']} | {r['precision']} | {n} | {r[key]:.0f} | {exact:.0f} | {equal[0]}/2 | {equal[1]}/2 | "
                f"{r['max_abs_logit_drift']:.3f} | {r['greedy_agreement_default_vs_exact']:.2f} |"
            )
    timed = [r for r in rows if "graph_1_ms" in r]
    if timed:
        lines += [
            "",
            "Where a default-mode step's time goes: its wall time as the sessions see it (from the tok/s above) "
            "against its captured graph replayed alone; the rest is host work (address table, copies in, "
            "sampling, the threads' hand-offs).",
            "",
            "| model | precision | rows | step ms | graph alone ms | host share |",
            "|---|---|---|---|---|---|",
        ]
        for r in timed:
            steps = {1: 1000 / r["ours_tok_s"]}
            for key in (k for k in r if k.startswith("graph_") and k.endswith("_ms") and k != "graph_1_ms"):
                n = int(key.split("_")[1])
                if f"ours_{n}_sessions_tok_s" in r:
                    steps[n] = n * 1000 / r[f"ours_{n}_sessions_tok_s"]
            for n, wall in steps.items():
                alone = r[f"graph_{n}_ms"]
                lines.append(
                    f"| {r['model']} | {r['precision']} | {n} | {wall:.2f} | {alone:.2f} | {1 - alone / wall:.0%} |"
                )
    longs = [(r, k) for r in rows for k in r if k.startswith("long_")]
    if longs:
        lines += ["", "Long prompts (prefill through the engine, bf16):", ""]
        lines += [
            f"- {r['model']}: {k[5:]} = {r[k]:.2f}" if isinstance(r[k], float) else f"- {r['model']}: {k[5:]} = {r[k]}"
            for r, k in longs
        ]
    errors = [(r, k) for r in rows for k in r if k.endswith("_error")]
    lines += [f"- {r['model']} {r['precision']}: {k} {r[k]}" for r, k in errors]
    (out / "decode.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--precisions", default="bf16,nf4")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--peer-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--sessions", default="16")
    parser.add_argument("--long", type=int, default=0, help="also prefill a prompt of this many tokens (bf16)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--compiled-peer", default="gemma3-270m,qwen3-8b", help="models for the compiled peer (~1 min each)"
    )
    parser.add_argument("--combine", nargs="*", help="write the docs from these decode.json files and stop")
    parser.add_argument("--work", default="/dev/shm/llm-gpu-bench")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "gpu"))
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        write([r for part in parts for r in part["rows"]], Path(args.out), parts[0]["facts"])
        return
    args.precisions = args.precisions.split(",")
    args.compiled_peer = args.compiled_peer.split(",")
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in args.models.split(","):
        folder = Path(args.work) / name
        started = time.perf_counter()
        build(name, folder)
        print(json.dumps({"model": name, "built_s": time.perf_counter() - started}), flush=True)
        rows += measure(name, folder, args)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    write(rows, Path(args.out))


if __name__ == "__main__":
    main()
