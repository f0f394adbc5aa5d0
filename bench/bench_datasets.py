"""Benchmark: load + validate + count tokens of a 50,000-example JSONL file.

Baseline (same run): the OpenAI Cookbook's data-prep loop, written inline — `json.loads` of every line into a
list, its format checks, and `len(encoding.encode(value))` per message value through the tiktoken-compatible
`Encoding` API. Ours: `ChatDataset.from_jsonl(...).validate()` + `.stats()`, and the streaming `validate_file`.

    python bench/bench_datasets.py [n_examples]

Prints a table and writes bench/results/datasets.json. Peak memory is traced Python allocations (tracemalloc)
in a separate, untimed run.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from llmlab import tokens
from llmlab.datasets import ChatDataset, validate_file
from llmlab.paths import atomic_write_text

MODEL = "gpt-4o-mini"
WORDS = [
    "leave",
    "policy",
    "days",
    "manager",
    "approve",
    "request",
    "remote",
    "office",
    "expense",
    "travel",
    "budget",
    "laptop",
    "security",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_leave_balance",
            "description": "Remaining leave days of an employee",
            "parameters": {"type": "object", "properties": {"employee_id": {"type": "string"}}},
        },
    }
]


def synthetic_file(path: Path, n: int, seed: int = 0) -> Path:
    """n chat examples (system, user, assistant; every 10th a tool call round trip), one per line."""
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    lines = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "You are the Acme HR assistant. Answer briefly."},
            {"role": "user", "content": f"#{i} " + say(rng.randint(5, 30))},
        ]
        example = {"messages": messages}
        if i % 10 == 0:
            call = {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "get_leave_balance", "arguments": json.dumps({"employee_id": f"E{i}"})},
            }
            messages += [
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {
                    "role": "tool",
                    "tool_call_id": f"call_{i}",
                    "content": json.dumps({"days": rng.randint(0, 30)}),
                },
            ]
            example["tools"] = TOOLS
        messages.append({"role": "assistant", "content": say(rng.randint(10, 80))})
        lines.append(json.dumps(example))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def cookbook_baseline(path: Path) -> dict:
    """The Cookbook's chat data-prep loop (format checks, then token counts and distributions), inline."""
    import numpy as np

    encoding = tokens.encoding_for(MODEL)
    with open(path, encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]
    format_errors: dict[str, int] = {}
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] = format_errors.get("data_type", 0) + 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] = format_errors.get("missing_messages_list", 0) + 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] = format_errors.get("message_missing_key", 0) + 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                format_errors["message_unrecognized_key"] = (
                    format_errors.get("message_unrecognized_key", 0) + 1
                )
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] = format_errors.get("unrecognized_role", 0) + 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, (str, type(None))):
                format_errors["missing_content"] = format_errors.get("missing_content", 0) + 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] = (
                format_errors.get("example_missing_assistant_message", 0) + 1
            )

    def num_tokens_from_messages(messages):
        num_tokens = 0
        for message in messages:
            num_tokens += 3
            for key, value in message.items():
                if isinstance(value, str):  # the Cookbook encodes every value; non-strings would crash it
                    num_tokens += len(encoding.encode(value))
                if key == "name":
                    num_tokens += 1
        return num_tokens + 3

    def num_assistant_tokens_from_messages(messages):
        return sum(
            len(encoding.encode(m["content"])) for m in messages if m["role"] == "assistant" and m["content"]
        )

    n_tokens = [num_tokens_from_messages(ex["messages"]) for ex in dataset]
    n_assistant = [num_assistant_tokens_from_messages(ex["messages"]) for ex in dataset]
    n_messages = [len(ex["messages"]) for ex in dataset]
    dist = {
        name: (min(v), max(v), np.mean(v), np.median(v), np.quantile(v, 0.1), np.quantile(v, 0.9))
        for name, v in (("tokens", n_tokens), ("assistant", n_assistant), ("messages", n_messages))
    }
    return {
        "examples": len(dataset),
        "errors": sum(format_errors.values()),
        "tokens": sum(n_tokens),
        "dist": dist,
    }


def ours_dataset(path: Path) -> dict:
    ds = ChatDataset.from_jsonl(path)
    report = ds.validate(MODEL)
    stats = ds.stats(MODEL)
    _ = stats.summary
    return {
        "examples": len(ds),
        "errors": len(report.errors),
        "tokens": int(stats.per_example["total_tokens"].sum()),
    }


def ours_streaming(path: Path) -> dict:
    report = validate_file(path, MODEL)
    return {"examples": report.n_examples, "errors": len(report.errors), "tokens": None}


def measure(fn, path: Path, repeat: int = 3) -> dict:
    """Best of `repeat` timed runs (the machine is shared), then one traced run for peak memory."""
    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(path)
        seconds = min(seconds, time.perf_counter() - start)
    tracemalloc.start()
    fn(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_bytes": peak, **{k: v for k, v in result.items() if k != "dist"}}


def main(n: int = 50_000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_file(Path(tmp) / "train.jsonl", n)
        size = path.stat().st_size
        tokens.count_tokens("warm up", MODEL)  # load the tokenizer outside the timings
        tokens.encoding_for(MODEL)
        runs = {
            "cookbook loop (baseline)": measure(cookbook_baseline, path),
            "ChatDataset load+validate+stats": measure(ours_dataset, path),
            "validate_file (streaming)": measure(ours_streaming, path),
        }
    base = runs["cookbook loop (baseline)"]
    mine = runs["ChatDataset load+validate+stats"]
    assert mine["errors"] == 0 and mine["examples"] == n, mine
    print(f"{n:,} examples, file {size / 1e6:.1f} MB, model {MODEL}")
    print(
        f"{'run':34} {'seconds':>8} {'examples/s':>11} {'peak MB':>8} {'peak/file':>9} {'speedup':>8} {'errors':>7}"
    )
    for name, r in runs.items():
        r["examples_per_s"] = n / r["seconds"]
        r["peak_over_file"] = r["peak_bytes"] / size
        r["speedup_vs_baseline"] = base["seconds"] / r["seconds"]
        print(
            f"{name:34} {r['seconds']:8.2f} {r['examples_per_s']:11,.0f} {r['peak_bytes'] / 1e6:8.1f} "
            f"{r['peak_over_file']:9.2f} {r['speedup_vs_baseline']:7.2f}x {r['errors']:7}"
        )
    print("errors: the Cookbook loop flags every tool-calling example (it knows no tools); ours finds none.")
    print(f"token totals: baseline {base['tokens']:,} (no tool definitions/calls), ours {mine['tokens']:,}")
    results = {"n_examples": n, "file_bytes": size, "model": MODEL, "runs": runs}
    out = Path(__file__).parent / "results" / "datasets.json"
    atomic_write_text(out, json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
