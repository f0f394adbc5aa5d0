"""Benchmark LoRA training (`llmlab.local.training.train_lora`) against a plain peft + torch loop.

    python bench/bench_training.py         # prints a table, writes bench/results/training.json

Same examples (data/qa_train.jsonl), same LoRA config, batch size, learning rate and torch thread count.
The plain loop is what a tutorial writes: pad the batch, `model(input_ids, attention_mask, labels=...)`
(full-vocabulary logits at every position). Peak RSS is measured in child processes that load the chat
and embedding models, serve a generation while training (batch 4, ~100-token examples), as the local
server does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
from _memory import peak_mb

from llmlab.course.data import DATA_DIR
from llmlab.local.chat_format import render
from llmlab.local.cpu_limit import training_threads
from llmlab.local.embedding_runtime import EmbeddingRuntime
from llmlab.local.runtime import ChatRuntime, torch_threads
from llmlab.local.training import LORA_ALPHA, LORA_RANK, encode_example, train_lora
from llmlab.paths import REPO_ROOT, atomic_write_text, llmlab_home

EXAMPLES, EPOCHS, BATCH, LR = 16, 2, 4, 2e-3
CHECKPOINTING = "LLMLAB_ACTIVATION_CHECKPOINTING"  # llmlab.local.memory_limit: on where memory is tight


def examples() -> list[dict]:
    lines = (DATA_DIR / "qa_train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:EXAMPLES]


def plain_loop(rt: ChatRuntime, data: list[dict]) -> int:
    """The textbook loop: padded batches, labels -100 outside assistant tokens, full logits. Returns tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(rt.base_view(), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    encoded = [encode_example(rt.tokenizer, ex) for ex in data]
    tokens = 0
    for _ in range(EPOCHS):
        for start in range(0, len(encoded), BATCH):
            batch = encoded[start : start + BATCH]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), rt.tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, learn) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(
                    [t if keep else -100 for t, keep in zip(ids, learn, strict=True)]
                )
                mask[row, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tokens += int(mask.sum())
    return tokens


def speed(rt: ChatRuntime, data: list[dict]) -> dict:
    threads = training_threads(decoding=False)  # what a job alone trains with; both loops get the same cores
    torch.set_num_threads(threads)
    out = {}
    for run in range(2):  # interleaved; the fastest of each counts
        start = time.perf_counter()
        tokens = plain_loop(rt, data)
        plain = tokens / (time.perf_counter() - start)
        ours = {}
        for switch in ("0", "1"):  # activation checkpointing off (a laptop) and on (Binder's limit)
            os.environ[CHECKPOINTING] = switch
            start = time.perf_counter()
            result = train_lora(
                rt,
                data,
                n_epochs=EPOCHS,
                batch_size=BATCH,
                learning_rate=LR,
                seed=0,
                out_dir=tempfile.mkdtemp(),
                threads=threads,
            )
            ours[switch] = result.trained_tokens / (time.perf_counter() - start)
        out = {
            "plain_tok_s": max(plain, out.get("plain_tok_s", 0)),
            "runtime_tok_s": max(ours["0"], out.get("runtime_tok_s", 0)),
            "runtime_checkpointed_tok_s": max(ours["1"], out.get("runtime_checkpointed_tok_s", 0)),
            "final_train_loss": result.train_loss,
            "threads": threads,
            "run": run,
        }
    return out


def child(kind: str) -> None:
    """Serve chat + embeddings and train one epoch (ours or plain) at once; print the peak RSS in MB."""
    rt = ChatRuntime(llmlab_home())
    EmbeddingRuntime().embed(["warm up"] * 64)
    prompt = render([{"role": "user", "content": "Tell me about the sea."}])
    rt.generate(prompt, max_tokens=8)
    server = threading.Thread(target=lambda: [rt.generate(prompt, max_tokens=16) for _ in range(3)])
    server.start()
    data = examples()[:8]
    if kind == "ours":
        train_lora(
            rt, data, n_epochs=1, batch_size=BATCH, learning_rate=LR, seed=0, out_dir=tempfile.mkdtemp()
        )
    else:
        globals()["EPOCHS"] = 1
        torch.set_num_threads(torch_threads())
        plain_loop(rt, data)
    server.join()
    print(peak_mb())


def peak_rss(kind: str, checkpointing: str = "0") -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, CHECKPOINTING: checkpointing},
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rt = ChatRuntime(llmlab_home())
    data = examples()
    tokens = [len(encode_example(rt.tokenizer, ex)[0]) for ex in data]
    results = {
        "examples": len(data),
        "mean_tokens": sum(tokens) / len(tokens),
        "epochs": EPOCHS,
        "batch": BATCH,
    }
    results["speed"] = speed(rt, data)
    results["memory"] = {
        "serving_plus_training_peak_rss_mb": peak_rss("ours"),
        "serving_plus_checkpointed_training_peak_rss_mb": peak_rss("ours", checkpointing="1"),
        "serving_plus_plain_loop_peak_rss_mb": peak_rss("plain"),
    }
    s, m = results["speed"], results["memory"]
    plain_mb = m["serving_plus_plain_loop_peak_rss_mb"]
    rows = [
        ("LoRA tokens/s: train_lora vs plain peft loop", s["runtime_tok_s"], s["plain_tok_s"]),
        ("  the same, checkpointing (Binder's limit)", s["runtime_checkpointed_tok_s"], s["plain_tok_s"]),
        ("peak RSS MB serving+training: ours vs plain", m["serving_plus_training_peak_rss_mb"], plain_mb),
        (
            "  the same, checkpointing (Binder's limit)",
            m["serving_plus_checkpointed_training_peak_rss_mb"],
            plain_mb,
        ),
    ]
    results["ratios"] = {name: ours / base for name, ours, base in rows}
    print(f"{'measure':50} {'ours':>10} {'baseline':>10} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:50} {ours:10.1f} {base:10.1f} {ours / base:7.2f}")
    atomic_write_text(REPO_ROOT / "bench" / "results" / "training.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
