"""Benchmark of tool calling on the local backend.

1. Speed: per generated token, constrained tool-call decoding (llguidance grammar from the tools' JSON
   schemas) against unconstrained decoding of the same prompt. Target: ratio <= 1.5.
2. Quality on data/tools_eval.jsonl (questions with a known right tool and arguments): the share of
   correct tool choices and correct arguments for the base model with tool_choice="auto" (and "required"),
   then again after a short LoRA fine-tune on data/tools_train.jsonl through the server's fine-tuning API.

    python bench/bench_tools.py [--epochs 3] [--skip-finetune]

Prints the tables and writes bench/results/tools.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

from llmlab.course import company, evaluation, questions
from llmlab.course.data import DATA_DIR
from llmlab.paths import REPO_ROOT, atomic_write_text, llmlab_home

print = functools.partial(print, flush=True)  # progress shows when redirected to a log
RESULTS = REPO_ROOT / "bench" / "results" / "tools.json"


# ------------------------------------------------------------------------------------------ 1. speed
def bench_speed(tools: list[dict], question: str, repeats: int = 3) -> dict:
    """Seconds per generated token, constrained vs unconstrained, same prompt, greedy, warm caches."""
    from llmlab.local import tool_grammar
    from llmlab.local.runtime import ChatRuntime

    runtime = ChatRuntime(llmlab_home())
    functions = [t["function"] for t in tools]
    grammar = tool_grammar.call_grammar(functions, parallel=True)
    from llmlab.local.chat_format import render

    prompt = render([{"role": "user", "content": question}], tools=tools) + tool_grammar.call_syntax().opener
    start = time.perf_counter()
    runtime.generate(prompt, max_tokens=2, temperature=0, lark_grammar=grammar)  # first compile + load
    first_seconds = time.perf_counter() - start

    def per_token(**kw) -> tuple[float, int]:
        times, n = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            gen = runtime.generate(prompt, max_tokens=48, temperature=0, **kw)
            times.append((time.perf_counter() - t0) / max(gen.completion_tokens, 1))
            n = gen.completion_tokens
        return statistics.median(times), n

    free, free_n = per_token()
    constrained, constrained_n = per_token(lark_grammar=grammar)
    return {
        "unconstrained_s_per_token": free,
        "unconstrained_tokens": free_n,
        "constrained_s_per_token": constrained,
        "constrained_tokens": constrained_n,
        "ratio": constrained / free,
        "target_ratio": 1.5,
        "first_call_seconds_incl_compile": first_seconds,
    }


# ------------------------------------------------------------------------------------------ 2. quality
def evaluate(lab, model: str, cases: list[dict], tool_choice: str) -> dict:
    """Share of cases where the first tool call names the right tool (or none when none is right), and where
    its arguments are right too (`llmlab.course.evaluation.evaluate_tool_calls` asks and scores)."""
    start = time.perf_counter()
    scores = evaluation.evaluate_tool_calls(lab, cases, model=model, tool_choice=tool_choice, progress=False)
    rows = [
        {"question": r.question, "tool": r.tool, "arguments": r.arguments, "ok": bool(r.right_arguments)}
        for r in scores.itertuples()
    ]
    return {
        "model": model,
        "tool_choice": tool_choice,
        "n": len(scores),
        "called": float(scores["tool"].notna().mean()),
        "right_tool": float(scores["right_tool"].mean()),
        "right_arguments": float(scores["right_arguments"].mean()),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def finetune(lab, epochs: int) -> tuple[str, float]:
    """A short LoRA fine-tune on data/tools_train.jsonl through the server's OpenAI fine-tuning API."""
    start = time.perf_counter()
    with open(DATA_DIR / "tools_train.jsonl", "rb") as f:
        uploaded = lab.client.files.create(file=f, purpose="fine-tune")
    job = lab.client.fine_tuning.jobs.create(
        model=lab.finetune_model,
        training_file=uploaded.id,
        suffix="tools",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}},
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = lab.client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise RuntimeError(f"fine-tuning {job.status}: {job.error}")
    return job.fine_tuned_model, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    tools, cases = company.tool_definitions(), questions.load_tool_eval()

    speed = bench_speed(tools, cases[0]["question"])
    print("constrained vs unconstrained decoding, same prompt (s per generated token)")
    print(
        f"  unconstrained  {speed['unconstrained_s_per_token']:.4f}  ({speed['unconstrained_tokens']} tokens)"
    )
    print(f"  constrained    {speed['constrained_s_per_token']:.4f}  ({speed['constrained_tokens']} tokens)")
    print(f"  ratio          {speed['ratio']:.2f}x   (target <= 1.5x)")
    print(
        f"  first call incl. grammar compile and model load: {speed['first_call_seconds_incl_compile']:.1f} s"
    )

    import llmlab

    lab = llmlab.connect("local", quiet=True)
    runs: list[dict] = []
    finetune_seconds = None

    def save() -> None:  # after every phase: a long run that is stopped still leaves its numbers
        result = {
            "speed": speed,
            "quality": runs,
            "finetune_epochs": args.epochs,
            "finetune_seconds": finetune_seconds,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(RESULTS, json.dumps(result, indent=2))

    save()
    for choice in ("auto", "required"):
        runs.append(evaluate(lab, lab.chat_model, cases, choice))
        save()
    if not args.skip_finetune:
        model, finetune_seconds = finetune(lab, args.epochs)
        for choice in ("auto", "required"):
            runs.append(evaluate(lab, model, cases, choice))
            save()
    baseline = runs[0]
    print(f"\ntool choice on {len(cases)} held-out questions ({len(tools)} tools), greedy")
    print(f"  {'model':<52} {'tool_choice':<9} {'called':>7} {'tool ok':>8} {'args ok':>8} {'vs base':>8}")
    for r in runs:
        ratio = (
            r["right_arguments"] / baseline["right_arguments"]
            if baseline["right_arguments"]
            else float("nan")
        )
        print(
            f"  {r['model']:<52} {r['tool_choice']:<9} {r['called']:>7.0%} {r['right_tool']:>8.0%}"
            f" {r['right_arguments']:>8.0%} {ratio:>7.2f}x"
        )
    if finetune_seconds is not None:
        print(f"  fine-tune: {args.epochs} epochs on data/tools_train.jsonl in {finetune_seconds:.0f} s")
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
