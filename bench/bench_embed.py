"""embed() through the local server vs raw sentence-transformers on the same model, and a cached re-embed.

    python bench/bench_embed.py [--n 2000] [--repeat 3]

Baseline: `SentenceTransformer(all-MiniLM-L6-v2).encode(texts, batch_size=64, normalize_embeddings=True)`
in this process (what the server runs per request). embed() goes through the `openai` client, HTTP, the
server and back. Best of `--repeat` runs each, taking turns. Writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["LLMLAB_HOME"] = tempfile.mkdtemp(prefix="llmlab-bench-embed-")  # an empty embedding cache

import numpy as np  # noqa: E402

import llmlab  # noqa: E402
from llmlab.course.data import DATA_DIR  # noqa: E402
from llmlab.embed import embed  # noqa: E402
from llmlab.models import minilm_path  # noqa: E402
from llmlab.paths import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "embed.json"


def sentences(n: int) -> list[str]:
    """`n` distinct, realistic texts: pairs of handbook sentences (20-60 tokens each)."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((DATA_DIR / "handbook").glob("*.md")))
    units = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 4]
    out: dict[str, None] = {}
    step = 1
    while len(out) < n:
        for i in range(len(units)):
            out.setdefault(f"{units[i]} {units[(i + step) % len(units)]}")
            if len(out) == n:
                break
        step += 1
    return list(out)


def interleaved(repeat: int, **runs) -> dict[str, tuple[float, object]]:
    """Best time (and last result) of each run, taking turns so that a change in machine load hits all alike."""
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            t = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - t
            best[name] = (min(seconds, best.get(name, (seconds,))[0]), result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    texts = sentences(args.n)

    from sentence_transformers import SentenceTransformer

    raw_model = SentenceTransformer(str(minilm_path()), device="cpu")
    lab = llmlab.connect("local", quiet=True)
    embed(lab, ["warm up the server's model"], cache=False)
    raw_model.encode(["warm up"], batch_size=64)

    best = interleaved(
        args.repeat,
        raw=lambda: raw_model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True),
        nocache=lambda: embed(lab, texts, cache=False, progress=False),
    )
    (raw_s, raw), (nocache_s, vectors) = best["raw"], best["nocache"]
    (fill_s, _), (cached_s, cached) = (
        interleaved(1, fill=lambda: embed(lab, texts, progress=False))["fill"],
        interleaved(args.repeat, cached=lambda: embed(lab, texts, progress=False))["cached"],
    )
    max_diff = float(np.abs(vectors - raw).max())
    assert max_diff < 1e-3 and cached.shape == vectors.shape, (
        f"embed() differs from the baseline by {max_diff}"
    )

    rows = [
        ("sentence-transformers (baseline)", raw_s, 1.0),
        ("embed(cache=False) via local server", nocache_s, raw_s / nocache_s),
        ("embed() first run (fills the cache)", fill_s, raw_s / fill_s),
        ("embed() cached re-embed", cached_s, raw_s / cached_s),
    ]
    print(f"{args.n} texts, best of {args.repeat}; max |embed - raw| = {max_diff:.2e}")
    print(f"{'what':<40} {'seconds':>9} {'texts/s':>9} {'x baseline':>11}")
    for name, seconds, ratio in rows:
        print(f"{name:<40} {seconds:>9.3f} {args.n / seconds:>9.0f} {ratio:>10.2f}x")
    result = {
        "n_texts": args.n,
        "repeat": args.repeat,
        "baseline": "SentenceTransformer.encode(batch_size=64, normalize_embeddings=True), same process",
        "seconds": {
            "raw": raw_s,
            "embed_nocache": nocache_s,
            "embed_fill_cache": fill_s,
            "embed_cached": cached_s,
        },
        "ratio_embed_vs_raw": raw_s / nocache_s,
        "ratio_fill_cache_vs_raw": raw_s / fill_s,
        "cached_reembed_seconds": cached_s,
        "max_abs_diff": max_diff,
        "python": sys.version.split()[0],
    }
    atomic_write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
