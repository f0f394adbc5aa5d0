"""LoRA fine-tuning of the local chat model on OpenAI-format chat examples.

>>> result = train_lora(runtime, examples, n_epochs=8, batch_size=4, learning_rate=2e-3, seed=0,
...                     out_dir=home / "adapters" / "job-1")  # doctest: +SKIP
>>> runtime.load_adapter("my-model", result.adapter_dir)  # doctest: +SKIP

Examples may be a list or a `JsonlExamples` (a file read line by line when needed): training holds only
the current batch, each batch encoded when it is used, so memory is bounded by the batch, not the file.
Examples are rendered by `chat_format.render_pieces` (the same text inference sees) and the loss covers
only assistant tokens (the content and the closing `<|im_end|>`; `weight: 0` turns are skipped). Training
runs on `runtime.base_view()`: a second module tree over the serving model's own frozen weight tensors,
so serving continues (base and other adapters) while it trains and no second copy of the weights is
made. Where the ONNX engine serves (the torch model is not loaded for serving), training instead builds a
model of its own from the same float weight cache (`training_model`: on Linux its fp32 matrices memory-mapped, their
pages let go after each use; in bf16 on request, whose products are bf16, while the LoRA weights and their math,
the norms, the loss and the optimizer stay fp32), freed when the job ends. The LM head and the loss are computed only at the positions that have a target, which keeps the
full-vocabulary logits (the bulk of the memory) small.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import tempfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from llmlab.local.chat_format import render_pieces
from llmlab.local.cpu_limit import training_threads
from llmlab.local.memory_limit import checkpointing_wanted
from llmlab.local.training_model import bf16_training_model

LORA_RANK, LORA_ALPHA = 16, 32
DEFAULT_LEARNING_RATE = 2e-3
MAX_EXAMPLE_TOKENS = 2048  # longer examples are truncated
# A batch is run as micro-batches of at most this many (padded) tokens, gradients accumulated: the
# activations of backward then stay small whatever the batch size.
MICRO_BATCH_TOKENS = 128


@dataclass(frozen=True)
class StepInfo:
    step: int
    total_steps: int
    epoch: int
    train_loss: float
    valid_loss: float | None
    trained_tokens: int


@dataclass(frozen=True)
class EpochInfo:
    epoch: int
    checkpoint_dir: Path
    train_loss: float
    valid_loss: float | None


@dataclass(frozen=True)
class TrainResult:
    """`adapter_dir` holds the final adapter (None when cancelled); losses are the last epoch's."""

    adapter_dir: Path | None
    trained_tokens: int
    train_loss: float | None
    valid_loss: float | None
    steps: int
    cancelled: bool


class JsonlExamples(Sequence):
    """The examples of a (validated) JSONL file, each read from disk when asked for: only line offsets are held.

    >>> examples = JsonlExamples(DATA_DIR / "qa_train.jsonl")  # doctest: +SKIP
    >>> examples[0]["messages"][-1]["role"]  # doctest: +SKIP
    'assistant'
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._offsets, at = Path(path), array("q"), 0
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    self._offsets.append(at)
                at += len(raw)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            return _parse(f.readline())

    def __iter__(self) -> Iterator[dict]:
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield _parse(raw)


def _parse(raw: bytes) -> dict:
    return json.loads(raw.removeprefix(b"\xef\xbb\xbf"))  # a byte-order mark some editors write


def encode_example(tokenizer: Any, example: dict) -> tuple[list[int], list[bool]]:
    """Token ids of one example and, per token, whether the loss learns it (assistant tokens only).

    >>> ids, learn = encode_example(tokenizer, {"messages": [{"role": "user", "content": "Hi"},
    ...                                                     {"role": "assistant", "content": "Hello"}]})  # doctest: +SKIP
    >>> tokenizer.decode([t for t, keep in zip(ids, learn) if keep])  # doctest: +SKIP
    'Hello<|im_end|>'
    """
    pieces = render_pieces(example["messages"], example.get("tools"))
    spans, at = [], 0
    for text, trainable in pieces:
        if trainable:
            spans.append((at, at + len(text)))
        at += len(text)
    enc = tokenizer(
        "".join(text for text, _ in pieces), add_special_tokens=False, return_offsets_mapping=True
    )
    learn = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"][:MAX_EXAMPLE_TOKENS], learn[:MAX_EXAMPLE_TOKENS]


def _batch(encoded: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs, their attention mask, and the (row, position) -> next-token targets."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for row, (ids, learn) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        for pos in range(len(ids) - 1):
            if learn[pos + 1]:
                rows.append(row)
                cols.append(pos)
                targets.append(ids[pos + 1])
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "rows": torch.tensor(rows, dtype=torch.long),
        "cols": torch.tensor(cols, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
    }


def _micro_batches(items: list[tuple[list[int], list[bool]]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    groups: list[list[tuple[list[int], list[bool]]]] = []
    for item in items:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * max(len(i[0]) for i in [*group, item]) <= MICRO_BATCH_TOKENS:
            group.append(item)
        else:
            groups.append([item])
    return [_batch(group, pad_id) for group in groups]


def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets; the LM head runs only at those positions."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    logits = model.lm_head(hidden[batch["rows"], batch["cols"]])
    return torch.nn.functional.cross_entropy(logits.float(), batch["targets"], reduction="sum")


def _save_adapter(peft_model: Any, dest: Path) -> Path:
    """Save the adapter so that `dest` holds a complete adapter or none (other files in `dest` stay)."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".saving-"))
    try:
        peft_model.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json")  # the config goes last
        for name in names:
            os.replace(tmp / name, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _chunks(items: Sequence[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _mean_loss(model: Any, tokenizer: Any, examples: Sequence[dict], pad_id: int) -> float | None:
    """The mean loss per target token over `examples`, encoded a chunk at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in _chunks(examples, 64):
            for batch in _micro_batches([encode_example(tokenizer, ex) for ex in chunk], pad_id):
                total += float(batch_loss(model, batch))
                count += len(batch["targets"])
    return total / count if count else None


def _learnable(
    tokenizer: Any, examples: Sequence[dict], should_stop: Callable[[], bool] | None
) -> array | None:
    """The indices of the examples that have a token to learn, or None when `should_stop()` said stop."""
    usable = array("q")
    for i, example in enumerate(examples):
        if should_stop is not None and should_stop():
            return None
        if any(encode_example(tokenizer, example)[1][1:]):
            usable.append(i)
    return usable


def train_lora(
    runtime: Any,
    examples: Sequence[dict],
    *,
    n_epochs: int = 3,
    batch_size: int = 4,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    seed: int | None = None,
    validation_examples: Sequence[dict] | None = None,
    out_dir: str | os.PathLike,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int | None = None,
    start_from: str | os.PathLike | None = None,
) -> TrainResult:
    """Train a LoRA adapter (r=16, alpha=32, every linear layer of the decoder, AdamW, linear decay).

    Saves `out_dir/checkpoint-epoch-N` after each epoch and the final adapter in `out_dir`.
    `should_stop()` is polled before every example while the examples are read and before every step;
    when it returns True training stops at once (`cancelled=True`, no final adapter). Same seed, same data -> same adapter. `threads`: torch
    threads of the calling thread while it trains (restored after); by default chosen before each step by
    `cpu_limit.training_threads`: the available cores while the runtime decodes nothing, else one.
    `start_from`: a saved adapter to continue training from (a fine-tuned model fine-tuned again).
    """
    previous = torch.get_num_threads()
    try:
        return _train(
            runtime,
            examples,
            n_epochs,
            batch_size,
            learning_rate,
            seed,
            validation_examples,
            Path(out_dir),
            on_step,
            on_epoch,
            should_stop,
            start_from,
            (lambda: threads) if threads else (lambda: training_threads(decoding=runtime.decoding)),
        )
    finally:
        torch.set_num_threads(previous)
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the heap pages a job freed back to the OS (glibc keeps ~100 MB of them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _train(
    runtime: Any,
    examples: Sequence[dict],
    n_epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int | None,
    validation_examples: Sequence[dict] | None,
    out_dir: Path,
    on_step: Callable[[StepInfo], None] | None,
    on_epoch: Callable[[EpochInfo], None] | None,
    should_stop: Callable[[], bool] | None,
    start_from: str | os.PathLike | None,
    step_threads: Callable[[], int],
) -> TrainResult:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    seed = random.randrange(2**31) if seed is None else seed
    tokenizer = runtime.tokenizer
    usable = _learnable(tokenizer, examples, should_stop)
    if usable is None:
        return TrainResult(None, 0, None, None, 0, True)
    if not usable:
        raise ValueError("No example has an assistant message to learn from.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(seed)  # the LoRA A matrices are initialised from it
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    # on torch the serving model's own tensors; on ONNX a model of its own (fp32 mapped from the cache, or bf16)
    view = bf16_training_model(runtime) if runtime.engine == "onnx" else runtime.base_view()
    if checkpointing_wanted():
        # Keep each decoder layer's input only and recompute its insides during backward: a training step's
        # activations (~0.7 MB per token, ~90 MB for one tutorial example) are the largest part of the server's
        # peak memory with a job running; the same losses and adapter, for ~30% more time per step.
        view.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(view, config)
    if start_from is not None:  # the same rank and modules as every adapter trained here
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(Path(start_from) / "adapter_model.safetensors"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(usable) / batch_size)
    total_steps = steps_per_epoch * n_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    order_rng = random.Random(seed)
    step, trained_tokens = 0, 0
    train_loss = valid_loss = None
    base = model.base_model.model  # the LlamaForCausalLM holding the LoRA layers
    for epoch in range(1, n_epochs + 1):
        order = array("q", usable)
        order_rng.shuffle(order)
        epoch_sum, epoch_count = 0.0, 0
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                return TrainResult(None, trained_tokens, train_loss, valid_loss, step, True)
            torch.set_num_threads(step_threads())
            items = [encode_example(tokenizer, examples[i]) for i in order[start : start + batch_size]]
            micro = _micro_batches(items, pad_id)
            count = sum(len(m["targets"]) for m in micro)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in micro:
                loss = batch_loss(base, m)
                (loss / count).backward()
                loss_sum += loss.item()
            optimizer.step()
            schedule.step()
            step += 1
            trained_tokens += sum(len(ids) for ids, _ in items)
            epoch_sum, epoch_count = epoch_sum + loss_sum, epoch_count + count
            last = start + batch_size >= len(order)
            step_valid = None
            if last and validation_examples:
                model.eval()
                step_valid = valid_loss = _mean_loss(base, tokenizer, validation_examples, pad_id)
                model.train()
            if on_step is not None:
                on_step(StepInfo(step, total_steps, epoch, loss_sum / count, step_valid, trained_tokens))
        train_loss = epoch_sum / epoch_count
        checkpoint = _save_adapter(model, out_dir / f"checkpoint-epoch-{epoch}")
        if on_epoch is not None:
            on_epoch(EpochInfo(epoch, checkpoint, train_loss, valid_loss))
    _save_adapter(model, out_dir)
    return TrainResult(out_dir, trained_tokens, train_loss, valid_loss, step, False)
