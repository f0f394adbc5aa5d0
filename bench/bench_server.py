"""Benchmark the local server against its baselines, measured in the same run.

    python bench/bench_server.py            # writes bench/results/server.json

- chat tokens/s through the server (openai client, greedy) vs `ChatRuntime.generate` on the same prompt
  (target: overhead under 10%, i.e. ratio >= 0.9);
- embedding texts/s through the server (the SDK's default base64) vs raw sentence-transformers (>= 0.9x);
- peak RSS of one server process serving chat + embeddings, then also running a tutorial-size LoRA job
  (16 examples of data/qa_train.jsonl, batch 4, one epoch) through the API (target < 1.5 GB), in a fresh child process;
- concurrency (issue 16): 8 chat requests of 64 greedy tokens sent at once vs one alone, wall time through the
  server and the openai client (target: ratio <= 3), with the engine's peak batch and one stream's tokens/s.

    python bench/bench_server.py --concurrency-only   # that part only, updated in server.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _homes import fresh_home
from _memory import peak_mb

from llmlab.paths import atomic_write_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
CHAT_TOKENS, REPEATS = 48, 3
TEXTS = [  # every message of the Q&A training file: ~180 short texts, like a notebook's
    m["content"]
    for line in (REPO / "data" / "qa_train.jsonl").read_text().splitlines()
    for m in json.loads(line)["messages"]
]


def _start(home: Path):
    from openai import OpenAI

    from llmlab.local.server import create_app, serve_app_in_thread

    app = create_app(home)
    url, stop = serve_app_in_thread(app)
    return app.state.backend, OpenAI(base_url=url, api_key="local"), stop


def bench_chat(backend, client) -> dict:
    from llmlab.local.chat_format import render

    runtime = backend.models.chat()
    prompt = render(PROMPT)
    runtime.generate(prompt, max_tokens=4, temperature=0)  # load and warm up

    def direct() -> float:
        start = time.perf_counter()
        gen = runtime.generate(prompt, max_tokens=CHAT_TOKENS, temperature=0)
        return gen.completion_tokens / (time.perf_counter() - start)

    def served() -> float:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=CHAT_TOKENS, temperature=0
        )
        return response.usage.completion_tokens / (time.perf_counter() - start)

    runs = {"direct": [], "server": []}
    for _ in range(REPEATS):  # interleaved, so that a noisy neighbour hits both alike
        runs["direct"].append(direct())
        runs["server"].append(served())
    direct_tps, server_tps = statistics.median(runs["direct"]), statistics.median(runs["server"])
    return {
        "direct_tokens_per_s": direct_tps,
        "server_tokens_per_s": server_tps,
        "ratio": server_tps / direct_tps,
    }


CONCURRENT = [  # questions whose greedy answers run past 64 tokens
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot.",
    "Explain how a bicycle works, step by step.",
    "Describe a day at the beach.",
    "What is Python?",
    "Name three colours and describe each.",
    "Write a letter to a friend about your holiday.",
    "Explain how plants make food.",
]


def bench_concurrency(backend, client, tokens: int = 64) -> dict:
    """8 requests of `tokens` greedy tokens at once vs each alone: wall times and their ratio."""
    runtime = backend.models.chat()

    def ask(question: str) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": question}],
            max_tokens=tokens,
            temperature=0,
        )
        return time.perf_counter() - start, reply.usage.completion_tokens

    ask(CONCURRENT[0])  # load and warm up
    alone = [ask(q) for q in CONCURRENT]
    one = statistics.median(t for t, _ in alone)
    engine = getattr(runtime, "_onnx", None)
    if engine is not None and hasattr(engine, "scheduler"):
        engine.scheduler.peak = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        together = list(pool.map(ask, CONCURRENT))
    eight = time.perf_counter() - start
    return {
        "engine": runtime.engine,
        "one_request_s": one,
        "one_stream_tokens_per_s": statistics.median(n / t for t, n in alone),
        "eight_concurrent_s": eight,
        "ratio": eight / one,
        "completion_tokens_alone": [n for _, n in alone],
        "completion_tokens_together": [n for _, n in together],
        "peak_batch": engine.scheduler.peak if engine is not None and hasattr(engine, "scheduler") else 1,
    }


def print_concurrency(result: dict) -> None:
    print(f"{'concurrency (' + result['engine'] + ')':<42}{'8 at once':>12}{'one':>12}{'ratio':>8}  target")
    print(
        f"{'wall s, 8 x 64 greedy tokens vs 1':<42}{result['eight_concurrent_s']:>12.2f}"
        f"{result['one_request_s']:>12.2f}{result['ratio']:>8.2f}  <= 3.00"
    )
    print(f"{'one stream tokens/s (server)':<42}{'':>12}{result['one_stream_tokens_per_s']:>12.1f}")
    print(f"{'peak batch (sequences in one decode step)':<42}{result['peak_batch']:>12}")


def concurrency_only() -> None:
    """Measure the concurrency part alone and update it in server.json."""
    backend, client, stop = _start(fresh_home())
    result = bench_concurrency(backend, client)
    stop()
    print_concurrency(result)
    out = REPO / "bench" / "results" / "server.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["concurrency"] = result
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


def bench_embeddings(client) -> dict:
    from sentence_transformers import SentenceTransformer

    from llmlab.models import EMBEDDING_MODEL_ID, minilm_path

    raw = SentenceTransformer(str(minilm_path()), device="cpu")
    raw.encode(TEXTS[:8])
    client.embeddings.create(model=EMBEDDING_MODEL_ID, input=TEXTS[:8])

    def rate(call) -> float:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return len(TEXTS) / statistics.median(times)

    raw_rate = rate(lambda: raw.encode(TEXTS, batch_size=64, normalize_embeddings=True))
    server_rate = rate(lambda: client.embeddings.create(model=EMBEDDING_MODEL_ID, input=TEXTS))
    return {"raw_texts_per_s": raw_rate, "server_texts_per_s": server_rate, "ratio": server_rate / raw_rate}


def memory_child() -> None:
    """In a fresh process: serve chat + embeddings, then train a tutorial-size job; print peak RSS (MB)."""
    backend, client, stop = _start(fresh_home())
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=16)
    client.embeddings.create(model="text-embedding-3-small", input=TEXTS[:64])
    serving = peak_mb()
    lines = (REPO / "data" / "qa_train.jsonl").read_text().splitlines()[:16]  # 4 steps of batch 4: peak RSS
    upload = client.files.create(file=("qa_train.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    hyper = {"n_epochs": 1, "batch_size": 4}
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=upload.id,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, max_tokens=8
        )  # serving meanwhile
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    client.chat.completions.create(model=job.fine_tuned_model or "gpt-4o-mini", messages=PROMPT, max_tokens=8)
    stop()
    print(
        json.dumps(
            {
                "serving_peak_rss_mb": serving,
                "serving_and_training_peak_rss_mb": peak_mb(),
                "job_status": job.status,
                "trained_tokens": job.trained_tokens,
            }
        )
    )


def main() -> None:
    backend, client, stop = _start(fresh_home())
    chat = bench_chat(backend, client)
    concurrency = bench_concurrency(backend, client)
    embeddings = bench_embeddings(client)
    stop()
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True
    )
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    results = {
        "chat": chat,
        "concurrency": concurrency,
        "embeddings": embeddings,
        "memory": {
            **memory,
            "target_mb": 1536,
            "within_target": memory["serving_and_training_peak_rss_mb"] < 1536,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
    }
    print(f"{'measure':<42}{'server':>12}{'baseline':>12}{'ratio':>8}  target")
    print(
        f"{'chat tokens/s (vs runtime.generate)':<42}{chat['server_tokens_per_s']:>12.1f}"
        f"{chat['direct_tokens_per_s']:>12.1f}{chat['ratio']:>8.2f}  >= 0.90"
    )
    print(
        f"{'embedding texts/s (vs sentence-transformers)':<42}{embeddings['server_texts_per_s']:>12.1f}"
        f"{embeddings['raw_texts_per_s']:>12.1f}{embeddings['ratio']:>8.2f}  >= 0.90"
    )
    print_concurrency(concurrency)
    print(f"{'peak RSS MB, serving':<42}{memory['serving_peak_rss_mb']:>12.0f}")
    print(
        f"{'peak RSS MB, serving + LoRA job (batch 4)':<42}{memory['serving_and_training_peak_rss_mb']:>12.0f}"
        f"{1536:>12}{memory['serving_and_training_peak_rss_mb'] / 1536:>8.2f}  < 1.00"
    )
    out = REPO / "bench" / "results" / "server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        memory_child()
    elif "--concurrency-only" in sys.argv:
        concurrency_only()
    else:
        main()
