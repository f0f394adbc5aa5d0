"""Benchmark the shared local backend (one server per LLMLAB_HOME) against one server per kernel, same run.

    python bench/bench_backend.py           # writes bench/results/backend.json
    LLMLAB_ENGINE=onnx python bench/bench_backend.py --memory-only   # backend_memory_onnx.json: Binder's
                                            # scenario only, its server serving on the named engine

- memory, as on Binder (`MEM_LIMIT` = 2 GB): two notebook kernels (Python processes) both use chat and embeddings, then one runs a
  tutorial-size LoRA job (16 examples of data/qa_train.jsonl, batch 4, one epoch) while the other stays
  open. Reported: the sum of every process's peak resident memory (VmHWM; an upper bound of the total's
  peak) — shared: the two kernels + the one server process (target < 1.5 GB); baseline: each kernel with a
  server of its own in its process (what `connect()` did before).
- `connect()`: the first one in a fresh home and a fresh process (starts the server; returns once it
  answers /v1/models, target < 2 s; also with `import llmlab` before it, as a notebook's first cell does)
  and one when the server already runs (median of 5, target < 0.5 s).
- server start, side by side (median of 3 each, alternating): spawn to first /v1/models answer as the server
  starts now (port bound, /v1/models answered, then FastAPI, the openai types and the app built in a thread)
  and as it started before (those imports done before the port was bound).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _homes import fresh_home
from _memory import peak_mb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TRAIN = (REPO / "data" / "qa_train.jsonl").read_text().splitlines()[:16]
TARGET_MB, FIRST_CONNECT_S, CONNECT_S = 1536, 2.0, 0.5
BINDER_BYTES = 2 * 2**30


def kernel(mode: str, train: bool) -> None:
    """One notebook kernel: chat + embeddings, then (if `train`) a fine-tune; prints its own peak RSS."""
    from openai import OpenAI

    if mode == "shared":
        import llmlab

        client = llmlab.connect(quiet=True).client
    else:  # the baseline: a server in this process, as connect() used to start
        from llmlab.local.server import create_app, serve_app_in_thread

        url, _ = serve_app_in_thread(create_app())
        client = OpenAI(base_url=url, api_key="local")
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0
    )
    client.embeddings.create(model="text-embedding-3-small", input=TRAIN)
    if train:
        upload = client.files.create(file=("t.jsonl", "\n".join(TRAIN).encode()), purpose="fine-tune")
        hyper = {"n_epochs": 1, "batch_size": 4}
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=upload.id,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        )
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
    else:
        sys.stdin.readline()  # stays open (its memory counted) until the other kernel's job is done
    print(json.dumps({"peak_mb": peak_mb()}), flush=True)


def two_kernels(mode: str) -> dict:
    """Run the two kernels of `mode` in a fresh home; the peaks of every process of the kit."""
    from llmlab.local.process import read_record, stop_server

    home = fresh_home()
    # Binder's scenario: its 2 GB limit, said in MEM_LIMIT as JupyterHub does (training then checkpoints)
    env = {**os.environ, "LLMLAB_HOME": str(home), "PYTHONPATH": str(REPO), "MEM_LIMIT": str(BINDER_BYTES)}
    args = [sys.executable, __file__, "--kernel", mode]
    idle = subprocess.Popen([*args, "0"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    trainer = subprocess.Popen([*args, "1"], env=env, stdout=subprocess.PIPE, text=True)
    peaks = {
        "training_kernel_mb": json.loads(trainer.communicate(timeout=1800)[0].splitlines()[-1])["peak_mb"]
    }
    record = read_record(home)
    if record is not None:
        peaks["server_mb"] = peak_mb(record.pid)
    peaks["other_kernel_mb"] = json.loads(idle.communicate("\n", timeout=60)[0].splitlines()[-1])["peak_mb"]
    stop_server(home)
    return {**peaks, "total_mb": sum(peaks.values())}


FIRST_CONNECT = """
import json, statistics, sys, time
started = time.perf_counter()
import llmlab
imported = time.perf_counter()
llmlab.connect(quiet=True)
connected = time.perf_counter()
again = []
for _ in range(5):
    t = time.perf_counter()
    llmlab.connect(quiet=True)
    again.append(time.perf_counter() - t)
print(json.dumps({"first_connect_s": connected - imported, "import_and_first_connect_s": connected - started,
                  "connect_when_running_s": statistics.median(again)}))
"""


def connect_times() -> dict:
    """In a fresh kernel-like process and home: `import llmlab`, the first `connect()`, then 5 more."""
    from llmlab.local.process import stop_server

    home = fresh_home()
    env = {**os.environ, "LLMLAB_HOME": str(home), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CONNECT], env=env, capture_output=True, text=True, check=True
    )
    stop_server(home)
    return json.loads(out.stdout.splitlines()[-1])


def first_answer_s(imports_first: bool) -> float:
    """Seconds from spawning a home's server to its first /v1/models answer (`imports_first`: as before)."""
    from llmlab.local.process import answers, read_record, stop_server

    home = fresh_home()
    code = "import llmlab.local.server\n" if imports_first else ""
    code += "from llmlab.local.process import main\nmain()"
    env = {**os.environ, "LLMLAB_HOME": str(home), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, "--home", str(home)], env=env)
    while (record := read_record(home)) is None or not answers(record):
        if child.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    stop_server(home)
    child.wait(30)
    return seconds


def start_times() -> dict:
    now, before = [], []
    for _ in range(3):
        now.append(first_answer_s(False))
        before.append(first_answer_s(True))
    now_s, before_s = statistics.median(now), statistics.median(before)
    return {"now_s": now_s, "before_s": before_s, "speedup": before_s / now_s}


def main() -> None:
    shared, baseline = two_kernels("shared"), two_kernels("own")
    times = connect_times()
    start = start_times()
    results = {
        "memory": {
            "shared_server": shared,
            "server_per_kernel": baseline,
            "ratio": shared["total_mb"] / baseline["total_mb"],
            "target_mb": TARGET_MB,
            "within_target": shared["total_mb"] < TARGET_MB,
        },
        "connect": {
            **times,
            "targets_s": {"first": FIRST_CONNECT_S, "when_running": CONNECT_S},
            "within_target": times["first_connect_s"] < FIRST_CONNECT_S
            and times["connect_when_running_s"] < CONNECT_S,
            "server_start_to_first_models_answer": start,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
    }
    out = REPO / "bench" / "results" / "backend.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def memory_only() -> None:
    """Binder's scenario alone (shared server), on the engine `LLMLAB_ENGINE` names."""
    from llmlab.local.engine_onnx import engine_name

    engine = engine_name({k: v for k, v in os.environ.items() if k != "MEM_LIMIT"})
    shared = two_kernels("shared")
    results = {
        "engine": engine,
        "shared_server": shared,
        "target_mb": 1482,
        "within_target": shared["total_mb"] <= 1482,
    }
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    out = REPO / "bench" / "results" / f"backend_memory_{engine}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kernel"]:
        kernel(sys.argv[2], sys.argv[3] == "1")
    elif sys.argv[1:2] == ["--memory-only"]:
        memory_only()
    else:
        main()
