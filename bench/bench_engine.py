"""Benchmark the chat engines side by side in one run: ours on torch fp32, ours on ONNX Runtime GenAI int8
(`LLMLAB_ENGINE=onnx`), and llama.cpp (the prebuilt `xllamacpp` wheel, `bench` extra) on the same GGUF.

    python bench/bench_engine.py                # prints a table, writes bench/results/engine.json
    python bench/bench_engine.py --speed-only   # no quality guard (it takes ~9 minutes)

Speed, one and two threads: decode tokens/s of 128 greedy tokens after a ~90-token chat prompt, and prompt
reading tokens/s of a ~600-token prompt. Ours is timed through `ChatRuntime.generate` (our own decoding loop,
stop handling and detokenizing included), llama.cpp through `Server.handle_completions` with its prompt cache
off; both on the same prompt token ids, wall time, best of `--repeats`. Decode tokens/s = (n - 1) / (T(n) -
T(1)) with T(k) the time to generate k tokens; prompt tokens/s = prompt length / T(1).

Fine-tuned models: decode tokens/s (1 thread) with a LoRA adapter (r=16 on every linear layer, as training
makes, freshly initialised) switched in per request, and the seconds to make it servable (peft's load on torch;
export to ONNX Runtime's adapter format and load on ONNX).

Quality guard: the greedy answers (60 tokens) of fp32 and int8 to the course's questions whose source is a
handbook page (`load_questions`, 53), with that page as context (`rag.build_prompt`), scored with the
course's rule (`contains_facts`). Asked plainly, the base model knows none of these facts (0 either way).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _homes import fresh_home  # noqa: E402

from llmlab.course.data import DATA_DIR  # noqa: E402
from llmlab.course.questions import contains_facts, load_questions  # noqa: E402
from llmlab.index import Hit  # noqa: E402
from llmlab.local.chat_format import render  # noqa: E402
from llmlab.local.engine_onnx import build_onnx_model  # noqa: E402
from llmlab.local.prompt_cache import PromptCache  # noqa: E402
from llmlab.local.runtime import ChatRuntime  # noqa: E402
from llmlab.local.training import LORA_ALPHA, LORA_RANK  # noqa: E402
from llmlab.local.weights import load_chat_model  # noqa: E402
from llmlab.models import smollm2_gguf_path  # noqa: E402
from llmlab.paths import REPO_ROOT, atomic_write_text  # noqa: E402
from llmlab.rag import build_prompt  # noqa: E402

SYSTEM = (
    "You are the friendly assistant of Fernhollow, a company of 400 people. Answer employees' questions "
    "clearly and kindly, in plain English, with short paragraphs. When you tell a story, make it vivid, "
    "with names, places and a clear beginning, middle and end."
)
CHAT = render(
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Write a long story about a lighthouse keeper."},
    ]
)
HANDBOOK = "\n\n".join(
    (DATA_DIR / "handbook" / name).read_text() for name in ("leave.md", "travel.md", "expenses.md")
)
DECODE_TOKENS = 128
LONG_TOKENS = 600
Timer = Callable[[list[int], int], tuple[int, float]]  # (prompt ids, max tokens) -> (tokens made, seconds)


def best(fn: Callable[[], int], repeats: int) -> tuple[int, float]:
    """(fn's result, its fastest wall time of `repeats` calls): noise on a shared machine only adds time."""
    times, out = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def speeds(timer: Timer, chat: list[int], long: list[int], repeats: int) -> dict:
    """Decode and prompt-reading tokens/s of one engine at one thread count."""
    made, total = best(lambda: timer(chat, DECODE_TOKENS), repeats)
    _, first = best(lambda: timer(chat, 1), repeats)
    _, reading = best(lambda: timer(long, 1), repeats)
    return {
        "decode_tokens": made,
        "decode_tok_s": round((made - 1) / (total - first), 1),
        "prompt_tokens": len(long),
        "prompt_tok_s": round(len(long) / reading, 1),
    }


def ours(home: Path, engine: str, threads: int) -> tuple[ChatRuntime, Timer]:
    """A `ChatRuntime` on `engine` with `threads` threads (prompt cache off), and its timer."""
    os.environ.update(LLMLAB_ENGINE=engine, LLMLAB_THREADS=str(threads))
    try:
        runtime = ChatRuntime(home)
        runtime.tokenizer  # noqa: B018 - load now, outside the timings
    finally:
        del os.environ["LLMLAB_ENGINE"], os.environ["LLMLAB_THREADS"]
    runtime.prompt_cache = PromptCache(budget=0)  # every prompt is read in full, as for llama.cpp
    if runtime._onnx is not None:
        runtime._onnx.keep = 0  # the ONNX engine's own prompt cache
    return runtime, ours_timer(runtime)


def ours_timer(runtime: ChatRuntime, adapter: str | None = None) -> Timer:
    def timer(ids: list[int], tokens: int) -> int:
        prompt = runtime.tokenizer.decode(ids)
        return runtime.generate(prompt, temperature=0, max_tokens=tokens, adapter=adapter).completion_tokens

    return timer


def random_adapter(home: Path) -> Path:
    """A peft LoRA adapter shaped as training makes them, freshly made (B = 0: it answers as the base model,
    for as many tokens; speed does not depend on the weights' values)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_chat_model(home)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    folder = home / "adapters" / "bench"
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def with_adapter(home: Path, adapter: Path, chat: list[int], long: list[int], repeats: int) -> dict:
    """Decode speed with the adapter on each engine (1 thread), and the seconds to load it."""
    rows = {}
    for name, engine in (("ours torch fp32 + LoRA", "torch"), ("ours onnx int8 + LoRA", "onnx")):
        runtime, _ = ours(home, engine, 1)
        start = time.perf_counter()
        runtime.load_adapter("bench", adapter)
        ready = round(time.perf_counter() - start, 2)
        rows[name] = {
            "1 thread": {
                **speeds(ours_timer(runtime, "bench"), chat, long, repeats),
                "adapter_ready_s": ready,
            }
        }
        del runtime
        gc.collect()
    return rows


def llama_cpp(threads: int) -> tuple[object, Timer]:
    """llama.cpp's server (in process, no HTTP) on the package's GGUF, and its timer."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(smollm2_gguf_path())
    params.n_ctx, params.n_parallel, params.warmup = 2048, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)

    def timer(ids: list[int], tokens: int) -> int:
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "cache_prompt": False}
        return server.handle_completions(body)["usage"]["completion_tokens"]

    return server, timer


def quality(runtime: ChatRuntime, questions: list[dict]) -> list[bool]:
    """Whether each greedy answer (60 tokens, as `llmlab.course.evaluation.plain`), its handbook page as context, holds its facts."""
    right = []
    for q in questions:
        page = (DATA_DIR / "handbook" / q["source"]).read_text()
        messages = build_prompt(q["question"], [Hit(q["source"], 1.0, page, {})])
        answer = runtime.generate(render(messages), temperature=0, max_tokens=60).text
        right.append(contains_facts(answer, q["facts"]))
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true", help="no quality guard")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "engine.json")
    args = parser.parse_args()

    home = fresh_home()
    start = time.perf_counter()
    build_onnx_model(home)  # in the shared weight cache: built by the first run only
    build_seconds = round(time.perf_counter() - start, 1)
    rows: dict[str, dict] = {}
    for threads in (1, 2):
        for name, engine in (("ours torch fp32", "torch"), ("ours onnx int8", "onnx")):
            runtime, timer = ours(home, engine, threads)
            chat, long = runtime.encode(CHAT), runtime.encode(render([{"role": "user", "content": HANDBOOK}]))
            long = long[: LONG_TOKENS - 8] + long[-8:]  # keep the chat markers at the end
            rows.setdefault(name, {})[f"{threads} thread"] = speeds(timer, chat, long, args.repeats)
            del runtime, timer
            gc.collect()
        server, timer = llama_cpp(threads)
        rows.setdefault("llama.cpp (xllamacpp, GGUF Q4_1)", {})[f"{threads} thread"] = speeds(
            timer, chat, long, args.repeats
        )
        del server, timer
        gc.collect()
        print(json.dumps({k: v[f"{threads} thread"] for k, v in rows.items()}), flush=True)
    rows.update(with_adapter(home, random_adapter(home), chat, long, args.repeats))
    reference = rows["llama.cpp (xllamacpp, GGUF Q4_1)"]
    for row in rows.values():
        for threads, cell in row.items():  # the LoRA rows: vs llama.cpp without an adapter
            for key in ("decode_tok_s", "prompt_tok_s"):
                cell[key.replace("tok_s", "vs_llama_cpp")] = round(cell[key] / reference[threads][key], 2)

    guard = {}
    if not args.speed_only:
        questions = [q for q in load_questions().to_dict("records") if q["source"].endswith(".md")]
        right = {}
        for engine in ("torch", "onnx"):
            runtime, _ = ours(home, engine, 1)
            right[engine] = quality(runtime, questions)
            del runtime
            gc.collect()
        guard = {
            "questions": len(questions),
            "right fp32": sum(right["torch"]),
            "right int8": sum(right["onnx"]),
            "right in both": sum(a and b for a, b in zip(right["torch"], right["onnx"], strict=True)),
        }

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: other jobs were running)",
        "onnx_int8_ready_seconds": build_seconds,  # ~25 when this run built it, ~0 when cached
        "prompt": {"chat_tokens": len(chat), "decode_tokens": DECODE_TOKENS, "long_tokens": len(long)},
        "speed": rows,
        "quality_guard_handbook_page_as_context": guard,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(
        f"\n{'engine':34} {'threads':>8} {'decode tok/s':>13} {'x llama.cpp':>11} {'prompt tok/s':>13} {'x llama.cpp':>11}"
    )
    for name, row in rows.items():
        for threads, c in row.items():
            print(
                f"{name:34} {threads:>8} {c['decode_tok_s']:>13} {c['decode_vs_llama_cpp']:>11} "
                f"{c['prompt_tok_s']:>13} {c['prompt_vs_llama_cpp']:>11}"
            )
    if guard:
        print("quality guard (greedy answers, their handbook page as context):", json.dumps(guard))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
