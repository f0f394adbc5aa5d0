"""Benchmark the local model runtime against the raw libraries, in one run on this machine.

    python bench/bench_runtime.py          # prints a table, writes bench/results/runtime.json

Rows: cold start from the GGUF vs from the weight cache; decode tokens/s of `ChatRuntime.generate` vs
transformers' `model.generate` (same prompt, greedy); per-token time of constrained (llguidance JSON
schema) vs unconstrained decoding; torch.ao dynamic int8 vs fp32 (not used by default); decode tokens/s
vs llama.cpp on the same GGUF when `llama-cpp-python` is installed (optional: it compiles for minutes);
embedding throughput of `EmbeddingRuntime.embed` vs raw sentence-transformers; peak RSS of a serving process.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import peak_mb

from llmlab.course.data import DATA_DIR
from llmlab.local.chat_format import render
from llmlab.local.embedding_runtime import EmbeddingRuntime
from llmlab.local.runtime import ChatRuntime
from llmlab.models import minilm_path, smollm2_gguf_path
from llmlab.paths import REPO_ROOT, atomic_write_text, llmlab_home

STORY = render([{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}])
WEATHER = render(
    [{"role": "user", "content": "Weather in Paris as JSON: city, temperature_c, place.country."}]
)
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Berlin"]},
        "temperature_c": {"type": "number"},
        "place": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
    },
    "required": ["city", "temperature_c", "place"],
}
TOKENS = 48
REPEATS = 3


def best(fn, repeats: int = REPEATS) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls (noise on a shared machine only ever adds time), and a result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def cold_start() -> dict:
    home = Path(tempfile.mkdtemp(prefix="llmlab-bench-"))
    start = time.perf_counter()
    ChatRuntime(home).model  # noqa: B018
    gguf = time.perf_counter() - start
    start = time.perf_counter()
    ChatRuntime(home).model  # noqa: B018
    return {"from_gguf_s": gguf, "from_cache_s": time.perf_counter() - start}


def decode_speed(rt: ChatRuntime) -> dict:
    ids = torch.tensor([rt.encode(STORY)])
    model = rt.model
    torch.set_num_threads(rt.threads)  # the same torch threads for both

    def raw() -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)

    def ours() -> object:
        return rt.generate(STORY, temperature=0, max_tokens=TOKENS)

    raw()
    ours()
    t_raw, t_ours = [], []
    for _ in range(REPEATS):  # interleaved, so both see the same machine load
        t_raw.append(best(raw, 1)[0])
        t, gen = best(ours, 1)
        t_ours.append(t / gen.completion_tokens * TOKENS)
    return {"raw_generate_tok_s": TOKENS / min(t_raw), "runtime_tok_s": TOKENS / min(t_ours)}


def constrained_speed(rt: ChatRuntime) -> dict:
    rt.generate(WEATHER, temperature=0, json_schema=SCHEMA, max_tokens=TOKENS)  # compile once
    t_c, gen_c = best(lambda: rt.generate(WEATHER, temperature=0, json_schema=SCHEMA, max_tokens=TOKENS))
    t_u, gen_u = best(lambda: rt.generate(WEATHER, temperature=0, max_tokens=TOKENS))
    return {
        "constrained_s_per_token": t_c / gen_c.completion_tokens,
        "unconstrained_s_per_token": t_u / gen_u.completion_tokens,
        "constrained_output": gen_c.text,
    }


def int8_speed(rt: ChatRuntime) -> dict:
    ids = torch.tensor([rt.encode(STORY)])
    quantized = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(rt.model), {torch.nn.Linear}, dtype=torch.qint8
    )
    out = {}
    for name, model in (("fp32", rt.model), ("int8", quantized)):
        with torch.no_grad():
            t, seq = best(
                lambda m=model: m.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            )
        out[f"{name}_tok_s"] = TOKENS / t
        out[f"{name}_text"] = rt.tokenizer.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)
    return out


def embedding_speed() -> dict:
    from sentence_transformers import SentenceTransformer

    lines = [
        ln.strip() for p in sorted((DATA_DIR / "handbook").glob("*.md")) for ln in p.read_text().splitlines()
    ]
    texts = ([ln for ln in lines if len(ln) > 20] * 20)[:512]
    ours = EmbeddingRuntime()
    raw = SentenceTransformer(str(minilm_path()), device="cpu")
    ours.embed(texts[:8])
    raw.encode(texts[:8])
    t_ours, t_raw = [], []
    for _ in range(3):  # the same call EmbeddingRuntime.embed makes: batches of 64, normalized
        t_raw.append(best(lambda: raw.encode(texts, batch_size=64, normalize_embeddings=True), 1)[0])
        t_ours.append(best(lambda: ours.embed(texts), 1)[0])
    return {
        "texts": len(texts),
        "raw_texts_s": len(texts) / min(t_raw),
        "runtime_texts_s": len(texts) / min(t_ours),
    }


def llama_cpp_speed(rt: ChatRuntime) -> dict | None:
    """Greedy decode tokens/s of llama.cpp on the GGUF that our weights come from (same prompt, same
    threads), or None when `llama-cpp-python` is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=1024, n_threads=rt.threads, verbose=False)

    def run() -> int:
        out = llm.create_completion(STORY, max_tokens=TOKENS, temperature=0)
        return out["usage"]["completion_tokens"]

    run()
    t, tokens = best(run)
    return {"llama_cpp_tok_s": tokens / t, "gguf": smollm2_gguf_path().name}


def serving_rss() -> dict:
    """Peak RSS of a fresh process that loads both models, chats and embeds (measured in a child).

    (`_memory.peak_mb`: VmHWM, not ru_maxrss, which keeps the parent's high-water mark across fork + exec.)
    """
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from _memory import peak_mb; "
        "from llmlab.local.runtime import ChatRuntime; from llmlab.local.embedding_runtime import EmbeddingRuntime; "
        "from llmlab.local.chat_format import render; rt = ChatRuntime(); "
        "rt.generate(render([{'role': 'user', 'content': 'Hi'}]), max_tokens=32); "
        "EmbeddingRuntime().embed(['some text'] * 64); "
        "print(json.dumps(peak_mb()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    return {"serving_peak_rss_mb": float(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    results: dict = {"cold_start": cold_start()}
    rt = ChatRuntime(llmlab_home())
    results["decode"] = decode_speed(rt)
    results["constrained"] = constrained_speed(rt)
    results["int8"] = int8_speed(rt)
    results["llama_cpp"] = llama_cpp_speed(rt)
    results["embedding"] = embedding_speed()
    results["memory"] = serving_rss()
    results["bench_process_peak_rss_mb"] = peak_mb()
    r = results
    rows = [
        ("cold start: cache vs GGUF (s)", r["cold_start"]["from_cache_s"], r["cold_start"]["from_gguf_s"]),
        (
            "decode tok/s: runtime vs model.generate",
            r["decode"]["runtime_tok_s"],
            r["decode"]["raw_generate_tok_s"],
        ),
        (
            "s/token: constrained vs unconstrained",
            r["constrained"]["constrained_s_per_token"],
            r["constrained"]["unconstrained_s_per_token"],
        ),
        ("decode tok/s: int8 vs fp32 (raw generate)", r["int8"]["int8_tok_s"], r["int8"]["fp32_tok_s"]),
        (
            "embed texts/s: runtime vs sentence-transformers",
            r["embedding"]["runtime_texts_s"],
            r["embedding"]["raw_texts_s"],
        ),
    ]
    if r["llama_cpp"] is not None:
        rows.append(
            (
                "decode tok/s: runtime vs llama.cpp (same GGUF)",
                r["decode"]["runtime_tok_s"],
                r["llama_cpp"]["llama_cpp_tok_s"],
            )
        )
    results["ratios"] = {name: ours / base for name, ours, base in rows}
    print(f"{'measure':50} {'ours':>10} {'baseline':>10} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:50} {ours:10.3f} {base:10.3f} {ours / base:7.2f}")
    if r["llama_cpp"] is None:
        print(
            "llama.cpp: not installed (pip install llama-cpp-python, which compiles for minutes, to compare)"
        )
    print(f"peak RSS serving chat + embeddings: {r['memory']['serving_peak_rss_mb']:.0f} MB")
    print(f"constrained output: {r['constrained']['constrained_output']}")
    print(f"int8 text: {r['int8']['int8_text']!r}\nfp32 text: {r['int8']['fp32_text']!r}")
    atomic_write_text(REPO_ROOT / "bench" / "results" / "runtime.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
