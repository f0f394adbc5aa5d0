"""Benchmark the server's cold start: a new server process -> ready -> first chat answer, ONNX vs torch engine.

    python bench/bench_cold_start.py          # prints a table, writes bench/results/cold_start.json
    python bench/bench_cold_start.py --base /tmp/base   # also the ONNX engine of another tree ("onnx@base")
    python bench/bench_cold_start.py --engines onnx --repeats 2 --base /tmp/base   # a shorter run

`--base TREE`: a checkout of an earlier commit (e.g. `git archive <commit> llmlab | tar -x -C /tmp/base`), whose
`llmlab` the server then runs from, in the same rounds: a before/after under the same load.

The weights are prepared as set-up leaves them (`~/.cache/llmlab/weights`: the float cache and the int8 ONNX
model), so this is the first chat after set-up (issue 16's target: under 3 s). Each run starts
`python -m llmlab.local.process` (what `connect()` spawns) on a fresh home and measures, from the moment the
process is started: "ready", when `GET /v1/models` answers with the record's key; "first answer", when a
16-token greedy chat completion has come back through the `openai` client. The engines alternate, so a busy
neighbour hits both alike. One more run per engine under `python -X importtime` gives the import share: the
seconds spent importing modules, and those of torch, transformers and the other heavy packages (with
what they import).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
from _homes import fresh_home
from openai import OpenAI

from llmlab.local.process import read_record
from llmlab.paths import REPO_ROOT, atomic_write_text

ENGINES = ("onnx", "torch")
REPEATS = 3
HEAVY = (
    "torch",
    "transformers",
    "onnxruntime_genai",
    "llguidance",
    "tokenizers",
    "fastapi",
    "openai",
    "numpy",
)


def one_start(engine: str, importtime: bool = False, tree: str = str(REPO_ROOT)) -> dict:
    """Start a server (its `llmlab` from `tree`) on a fresh home; seconds from process start to ready and to the
    first chat answer."""
    home = fresh_home()
    env = {**os.environ, "LLMLAB_ENGINE": engine, "PYTHONPATH": tree}
    log = home / "server.log"
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "llmlab.local.process"]
    start = time.perf_counter()
    with open(log, "wb") as out:
        # cwd: `-m` puts the working directory first on the path, before PYTHONPATH
        child = subprocess.Popen([*command, "--home", str(home)], stdout=out, stderr=out, env=env, cwd=tree)
    try:
        record = None
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            record = record or read_record(home)
            if record is not None:
                try:
                    if httpx.get(f"{record.url}/models", headers=record.headers(), timeout=5).is_success:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        ready = time.perf_counter() - start
        client = OpenAI(base_url=record.url, api_key=record.key, timeout=300)
        answer = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        first = time.perf_counter() - start
    finally:
        child.terminate()
        child.wait(30)
    result = {"ready_s": ready, "first_answer_s": first, "text": answer.choices[0].message.content}
    if importtime:
        result |= import_seconds(log.read_text(encoding="utf-8", errors="replace"))
    return result


def import_seconds(report: str) -> dict:
    """From `-X importtime` output: seconds importing in all, and per heavy package: its modules' own time plus
    that of the modules they import (numpy imported by torch counts for torch; by the first heavy importer)."""
    lines = []
    for line in report.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            own, _, name = line.removeprefix("import time:").split("|")
            lines.append(((len(name) - len(name.lstrip()) - 1) // 2, int(own), name.strip().split(".")[0]))
    total, heavy, ancestors = 0, dict.fromkeys(HEAVY, 0), []
    for depth, own, package in reversed(lines):  # the report lists a module after the ones it imports
        ancestors = [*ancestors[:depth], package]
        total += own
        owner = next((p for p in ancestors if p in heavy), None)
        if owner is not None:
            heavy[owner] += own
    return {"import_s": total / 1e6, "imports": {name: micros / 1e6 for name, micros in heavy.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a tree of an earlier commit: its ONNX engine is measured too")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="which engines of this tree (onnx,torch)"
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed starts per setup (median)")
    args = parser.parse_args()
    setups = {engine: (engine, str(REPO_ROOT)) for engine in args.engines.split(",")}
    if args.base:
        setups["onnx@base"] = ("onnx", args.base)
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (engine, tree) in setups.items():
            runs[name].append(one_start(engine, tree=tree))
    profiled = {
        name: one_start(engine, importtime=True, tree=tree) for name, (engine, tree) in setups.items()
    }
    results = {}
    for name in setups:
        ready = statistics.median(r["ready_s"] for r in runs[name])
        first = statistics.median(r["first_answer_s"] for r in runs[name])
        prof = profiled[name]
        results[name] = {
            "ready_s": ready,
            "first_answer_s": first,
            "runs": runs[name],
            "importtime_run": prof,
            "import_share": prof["import_s"] / prof["first_answer_s"],
        }
    results["target_first_answer_s"] = 3.0
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    print(
        f"{'engine':10}{'ready s':>10}{'first answer s':>16}{'import share':>14}  imports (s, -X importtime run)"
    )
    for name in setups:
        r = results[name]
        heavy = ", ".join(f"{k} {v:.1f}" for k, v in r["importtime_run"]["imports"].items())
        print(
            f"{name:10}{r['ready_s']:>10.2f}{r['first_answer_s']:>16.2f}{r['import_share']:>14.0%}  {heavy}"
        )
    print(f"target: first answer < {results['target_first_answer_s']:.0f} s")
    atomic_write_text(
        REPO_ROOT / "bench" / "results" / "cold_start.json", json.dumps(results, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
