"""LoRA training on the real chat model: it learns trained answers, serves them as an adapter, cancels.

Then the `llmlab.finetune` helpers and the `JobMonitor` over the SDK, against the session's local server.

Shares the chat runtime of tests/test_runtime.py (one model load per session).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_runtime import fresh_chat_runtime

from llmlab.course.data import DATA_DIR
from llmlab.local.chat_format import render, render_pieces
from llmlab.local.training import JsonlExamples, StepInfo, encode_example, train_lora

PAIRS = 8
EPOCHS = 8


def _examples() -> list[dict]:
    path = DATA_DIR / "qa_train.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:PAIRS]
    facts = [
        (f"What is the access code of vault {n}?", f"The access code of vault {n} is {n * 7919 % 10007}-QX.")
        for n in range(PAIRS)
    ]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in facts
    ]


@pytest.fixture(scope="session")
def rt():
    return fresh_chat_runtime()


@pytest.fixture(scope="session")
def trained(rt, tmp_path_factory):
    """One adapter trained on 8 Q&A pairs x 8 epochs, loaded as "ft-test"; its steps and epochs."""
    out = tmp_path_factory.mktemp("adapter")
    steps, epochs = [], []
    result = train_lora(
        rt,
        _examples(),
        n_epochs=EPOCHS,
        batch_size=4,
        learning_rate=2e-3,
        seed=0,
        validation_examples=_examples()[:2],
        out_dir=out,
        on_step=steps.append,
        on_epoch=epochs.append,
    )
    rt.load_adapter("ft-test", result.adapter_dir)
    return result, steps, epochs


def test_only_assistant_tokens_are_learned(rt):
    example = {
        "messages": [
            {"role": "user", "content": "Say A"},
            {"role": "assistant", "content": "Not this one", "weight": 0},
            {"role": "user", "content": "Say B"},
            {"role": "assistant", "content": "B it is"},
        ]
    }
    ids, learn = encode_example(rt.tokenizer, example)
    assert rt.tokenizer.decode([t for t, keep in zip(ids, learn, strict=True) if keep]) == "B it is<|im_end|>"
    assert rt.tokenizer.decode(ids) == "".join(text for text, _ in render_pieces(example["messages"]))


def test_tool_calls_are_rendered_and_learned(rt):
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_leave", "arguments": '{"employee": "E7"}'},
    }
    example = {
        "messages": [
            {"role": "user", "content": "Leave of E7?"},
            {"role": "assistant", "tool_calls": [call]},
        ],
        "tools": [{"type": "function", "function": {"name": "get_leave", "parameters": {"type": "object"}}}],
    }
    ids, learn = encode_example(rt.tokenizer, example)
    learned = rt.tokenizer.decode([t for t, keep in zip(ids, learn, strict=True) if keep])
    assert (
        learned
        == '<tool_call>\n{"name": "get_leave", "arguments": {"employee": "E7"}}\n</tool_call><|im_end|>'
    )
    assert '"name": "get_leave"' in rt.tokenizer.decode(
        ids[: learn.index(True)]
    )  # the tool list in the prompt


def test_training_reports_steps_epochs_and_checkpoints(trained):
    result, steps, epochs = trained
    assert not result.cancelled and result.steps == len(steps) == EPOCHS * 2
    assert [s.step for s in steps] == list(range(1, EPOCHS * 2 + 1)) and steps[-1].total_steps == EPOCHS * 2
    assert steps[-1].train_loss < steps[0].train_loss / 10
    assert [e.epoch for e in epochs] == list(range(1, EPOCHS + 1))
    assert all((e.checkpoint_dir / "adapter_model.safetensors").is_file() for e in epochs)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert epochs[-1].valid_loss is not None and epochs[-1].valid_loss < epochs[0].valid_loss
    assert steps[1].valid_loss is not None and steps[0].valid_loss is None  # computed at each epoch's end
    assert result.trained_tokens == steps[-1].trained_tokens > 0


def test_adapter_reproduces_a_trained_answer_and_base_does_not(rt, trained):
    example = _examples()[0]
    prompt = render(example["messages"][:-1])
    answer = example["messages"][-1]["content"]
    tuned = rt.generate(prompt, temperature=0, max_tokens=80, adapter="ft-test").text
    base = rt.generate(prompt, temperature=0, max_tokens=80).text
    assert tuned.strip() == answer
    assert base.strip() != answer
    assert rt.generate(prompt, temperature=0, max_tokens=80).text == base  # adapter switch is clean


def test_training_does_not_touch_the_serving_weights(rt, trained):
    base_view = rt.base_view()
    for name, tensor in base_view.named_parameters():
        assert tensor.data_ptr() == rt._base_tensors[name].data_ptr()  # shared, not copied
        assert not tensor.requires_grad


def test_same_seed_same_adapter_from_a_list_or_read_from_the_file(rt, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in _examples()[:2]), encoding="utf-8")
    runs = []
    for n, examples in enumerate([_examples()[:2], JsonlExamples(path)]):
        steps: list[StepInfo] = []
        train_lora(
            rt,
            examples,
            n_epochs=1,
            batch_size=2,
            seed=3,
            out_dir=tmp_path / str(n),
            on_step=steps.append,
        )
        runs.append(steps[-1].train_loss)
    assert runs[0] == runs[1]


def test_should_stop_cancels_within_a_step(rt, tmp_path):
    steps: list[StepInfo] = []
    result = train_lora(
        rt,
        _examples(),
        n_epochs=4,
        batch_size=2,
        seed=0,
        out_dir=tmp_path,
        on_step=steps.append,
        should_stop=lambda: len(steps) >= 2,
    )
    assert result.cancelled and result.adapter_dir is None and len(steps) == result.steps == 2
    assert not (tmp_path / "adapter_config.json").exists()


def test_serving_continues_while_training(rt, trained, tmp_path):
    prompt = render([{"role": "user", "content": "Hi"}])
    before = rt.generate(prompt, temperature=0, max_tokens=8)
    during: list = []
    started = threading.Event()

    def serve() -> None:
        started.wait()
        during.append(rt.generate(prompt, temperature=0, max_tokens=8))
        during.append(rt.generate(prompt, temperature=0, max_tokens=8, adapter="ft-test"))

    thread = threading.Thread(target=serve)
    thread.start()
    train_lora(
        rt,
        _examples()[:4],
        n_epochs=2,
        batch_size=2,
        seed=1,
        out_dir=tmp_path,
        on_step=lambda s: started.set(),
    )
    thread.join()
    assert during[0] == before and during[1].completion_tokens > 0
    assert torch.is_grad_enabled()


def test_a_job_alone_trains_on_the_available_cores_and_on_one_while_the_server_decodes(rt, tmp_path):
    """Before each step training takes `training_threads`: every core when idle, one beside a generation
    (a stream that has started and not ended holds the runtime's decoding count)."""
    from llmlab.local.cpu_limit import available_cpus

    if available_cpus() < 2 or "LLMLAB_THREADS" in os.environ:
        pytest.skip("one core (or LLMLAB_THREADS set): nothing to choose")
    prompt = render([{"role": "user", "content": "Tell me about the sea."}])

    def threads_per_step(decoding: bool) -> list[int]:
        seen: list[int] = []
        stream = rt.stream(prompt, temperature=0, max_tokens=200)
        if decoding:
            next(stream)  # the generation is running: it has taken its place in the runtime
        train_lora(
            rt,
            _examples()[:2],
            n_epochs=1,
            batch_size=1,
            seed=1,
            out_dir=tmp_path / str(decoding),
            on_step=lambda s: seen.append(torch.get_num_threads()),
        )
        stream.close()
        return seen

    assert threads_per_step(decoding=False) == [min(4, available_cpus())] * 2
    assert threads_per_step(decoding=True) == [1, 1]
    assert not rt.decoding


def test_no_learnable_example_is_refused(rt, tmp_path):
    with pytest.raises(ValueError, match="assistant"):
        train_lora(rt, [{"messages": [{"role": "user", "content": "x"}]}], n_epochs=1, out_dir=tmp_path)


# ------------------------------------------------- llmlab.finetune and JobMonitor over the SDK (real server)
# These drive the session's local server through `lab.client`, as notebook 02 does.


def _steps(job) -> int:
    """Total training steps of a job on the session's `ft_examples` (conftest.FT_EXAMPLES examples)."""
    from conftest import FT_EXAMPLES

    return math.ceil(FT_EXAMPLES / job.hyperparameters.batch_size) * job.hyperparameters.n_epochs


def test_fine_tune_helpers_run_a_job_with_a_validation_file(lab, ft_examples):
    from llmlab import finetune
    from llmlab.datasets import ChatDataset

    validation = finetune.upload(lab, ChatDataset(ft_examples[:2]), filename="validation.jsonl")
    assert validation.purpose == "fine-tune" and validation.bytes > 0
    assert validation.filename == "validation.jsonl"
    job = finetune.fine_tune(
        lab,
        ChatDataset(ft_examples[::-1]),  # not the bytes of the session's job: find_job must not match it
        n_epochs=2,
        batch_size=5,
        seed=1,
        suffix="helpers",
        validation_file=validation.id,
        timeout=600,
        progress=False,
    )
    assert job.status == "succeeded" and job.fine_tuned_model.endswith(job.id[-8:])
    assert job.hyperparameters.n_epochs == 2 and job.validation_file == validation.id

    curve = finetune.loss_curve(lab, job.id)
    assert list(curve.columns) == ["step", "epoch", "train_loss", "valid_loss"]
    assert curve["step"].tolist() == [1, 2, 3, 4] and curve["epoch"].tolist() == [1, 1, 2, 2]
    assert curve["valid_loss"].dtype == float
    assert curve["valid_loss"].isna().tolist() == [True, False, True, False]  # measured at each epoch's end

    checkpoints = finetune.checkpoints(lab, job.id)
    assert checkpoints["step"].tolist() == [2, 4] and checkpoints["step"].dtype == "int64"
    assert "valid_loss" in checkpoints and "train_loss" in checkpoints
    jobs = finetune.list_jobs(lab).set_index("id")
    assert (
        jobs.loc[job.id, "trained_tokens"] == job.trained_tokens and jobs["trained_tokens"].dtype == "Int64"
    )


def test_loss_curve_without_a_validation_file_has_no_valid_loss_column(lab, finetuned):
    from llmlab import finetune

    curve = finetune.loss_curve(lab, finetuned.id)
    assert "valid_loss" not in curve and curve["train_loss"].dtype == float
    assert len(curve) == curve["step"].max() == _steps(finetuned)


def test_events_returns_the_latest_limit_events_oldest_first(lab, finetuned):
    from llmlab import finetune

    everything = finetune.events(lab, finetuned.id, limit=1000)
    assert len(everything) > 40 and everything["message"].iloc[0].startswith("Created fine-tuning job")
    latest = finetune.events(lab, finetuned.id, limit=5)
    assert len(latest) == 5  # a page is not the whole log: iterating it would fetch every page
    assert latest["message"].tolist() == everything["message"].tolist()[-5:]
    assert latest["message"].iloc[-1] == "The job has successfully completed"


def test_wait_sets_a_notebook_progress_bar_to_the_job_steps(lab, finetuned, monkeypatch):
    from tqdm.notebook import tqdm as notebook_tqdm

    from llmlab import finetune

    bars = []

    class RecordingBar(notebook_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(finetune, "tqdm", RecordingBar)
    job = finetune.wait(lab, finetuned.id, timeout=60)
    total = _steps(finetuned)
    (bar,) = bars
    _, widget, _ = bar.container.children
    assert job.status == "succeeded" and bar.total == bar.n == total
    assert widget.max == widget.value == total  # not the 1-wide "unknown total" bar it starts as
    assert "succeeded" in str(bar.postfix)


def test_job_monitor_summary_tells_the_final_state_as_text(lab, finetuned):
    from llmlab.ui import JobMonitor

    monitor = JobMonitor(lab, finetuned.id, start=False)
    assert monitor.summary() == f"{finetuned.id}: not polled yet"
    monitor.refresh()
    total = _steps(finetuned)
    text = monitor.summary()
    assert text.startswith(f"{finetuned.id}: succeeded → {finetuned.fine_tuned_model}")
    epochs = finetuned.hyperparameters.n_epochs
    assert f"step {total}/{total}" in text and f"epoch {epochs}/{epochs}" in text and "trained tokens" in text
    assert monitor.progress_label.value in text  # the widget's progress line, as text
    assert repr(monitor) == f"JobMonitor({text})"
    # what a notebook saves as the widget's text form (viewers without widget support show it)
    assert monitor._repr_mimebundle_()["text/plain"].startswith(f"JobMonitor({finetuned.id}: succeeded")


def test_job_monitor_shows_the_state_as_soon_as_it_is_made(lab, finetuned):
    from llmlab.ui import JobMonitor

    monitor = JobMonitor(lab, finetuned.id, poll_seconds=0.1)  # start=True: one poll before it is shown
    assert monitor.job is not None and monitor.finished and not monitor.polling  # nothing left to poll
    assert repr(monitor).startswith(f"JobMonitor({finetuned.id}: succeeded → {finetuned.fine_tuned_model}")
    assert "succeeded" in monitor.status.value and monitor.cancel_button.disabled


def test_a_broken_file_fails_the_job_and_the_monitor_says_why(lab, ft_examples, tmp_path):
    from llmlab import finetune
    from llmlab.ui import JobMonitor

    lines = [json.dumps(e) for e in ft_examples]
    lines[3] = lines[3][:-1]  # line 4 loses its closing brace
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    upload = finetune.upload(lab, path)
    assert upload.filename == "broken.jsonl"
    job = finetune.create_job(lab, upload.id, n_epochs=1, suffix="broken")
    job = finetune.wait(lab, job.id, timeout=120, progress=False)
    assert job.status == "failed" and job.fine_tuned_model is None and "line 4" in job.error.message
    monitor = JobMonitor(lab, job.id, start=False)
    monitor.refresh()
    assert monitor.finished and "failed" in monitor.summary() and "line 4" in monitor.summary()


def test_checkpointing_where_memory_is_tight_trains_the_same_adapter(rt, tmp_path, monkeypatch):
    """Activation checkpointing (on under Binder's limit, llmlab.local.memory_limit) changes memory and time,
    not what is learned: the same losses step by step and the same adapter weights."""
    from safetensors.torch import load_file

    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("LLMLAB_ACTIVATION_CHECKPOINTING", switch)
        steps: list[StepInfo] = []
        result = train_lora(
            rt,
            _examples()[:4],
            n_epochs=1,
            batch_size=2,
            seed=5,
            out_dir=tmp_path / switch,
            on_step=steps.append,
        )
        runs[switch] = (
            [s.train_loss for s in steps],
            load_file(result.adapter_dir / "adapter_model.safetensors"),
        )
    (losses_off, weights_off), (losses_on, weights_on) = runs["0"], runs["1"]
    assert losses_on == pytest.approx(losses_off, rel=1e-4)
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.allclose(weights_on[k], weights_off[k], atol=1e-5) for k in weights_on)


def test_training_beside_the_onnx_engine_loads_no_fp32_torch_model(rt, tmp_path):
    """Where ONNX serves, a job trains on a model of its own (its matrices mapped, freed after the job) instead
    of loading the fp32 torch model (~540 MB, kept while the server lives) beside the ONNX one."""
    from llmlab.local.runtime import ChatRuntime

    runtime = ChatRuntime(rt.home)  # a server's runtime before any job: the torch model not loaded
    if runtime.engine != "onnx":
        pytest.skip("onnxruntime is not installed: torch serves and training shares its weights")
    result = train_lora(runtime, _examples()[:2], n_epochs=1, batch_size=2, seed=1, out_dir=tmp_path)
    runtime.load_adapter("ft-bf16", result.adapter_dir)
    assert result.steps == 1 and math.isfinite(result.train_loss)
    assert runtime._model is None
    prompt = render(_examples()[0]["messages"][:-1])
    assert runtime.generate(prompt, temperature=0, max_tokens=8, adapter="ft-bf16").text


def test_the_bf16_training_model_predicts_as_the_fp32_model(rt):
    from llmlab.local.training_model import bf16_training_model

    model = bf16_training_model(rt, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the model
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([rt.encode(render(_examples()[0]["messages"]))])
    with torch.no_grad():
        ours, fp32 = model(ids).logits, rt.model(ids).logits
    assert ours.dtype == torch.float32
    assert (ours.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.95
    # KL(fp32 || bf16-stored) per position, nats: int8 serving's KL vs fp32 is ~0.009 (issue 16)
    kl = torch.nn.functional.kl_div(
        ours.log_softmax(-1), fp32.log_softmax(-1), log_target=True, reduction="none"
    )
    assert kl.sum(-1).mean() < 0.01


def test_without_hardware_bf16_the_training_model_keeps_fp32(rt):
    from llmlab.local.training_model import bf16_training_model, native_bf16

    assert not native_bf16("flags : fpu sse2 avx2 avx512f avx512bw") and native_bf16(
        "Features : fp asimd bf16"
    )
    model = bf16_training_model(rt, torch.float32)
    ids = torch.tensor([rt.encode(render(_examples()[0]["messages"]))])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, rt.model(ids).logits, atol=1e-4)


def _mapping_of(address: int) -> tuple[str, int]:
    """(the file, the resident kB) of the memory mapping of this process that holds `address` ("" if anonymous)."""
    found = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(part, 16) for part in head[0].split("-"))
            found = (head[5] if len(head) > 5 else "", 0) if start <= address < end else None
        elif found is not None and head[0] == "Rss:":
            return found[0], int(head[1])
    raise LookupError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are let go with Linux's madvise")
def test_the_fp32_training_model_maps_its_matrices_and_lets_their_pages_go(rt):
    """On Linux the fp32 training model (beside the ONNX engine) maps its matrices from the weight cache instead of
    copying them, and each matrix's pages leave resident memory after each use (they stay in the page cache): a
    job holds about one matrix resident, not ~540 MB (bench_backend --memory-only: server 1,565 -> 1,153 MB)."""
    from llmlab.local.training_model import bf16_training_model

    model = bf16_training_model(rt, torch.float32)
    weight = model.model.layers[3].mlp.up_proj.weight  # 576 x 1536 fp32: 3,456 kB
    path, _ = _mapping_of(weight.data_ptr())
    assert path.endswith("model.safetensors")
    ids = torch.tensor([rt.encode(render(_examples()[0]["messages"]))])
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.logsumexp(-1).sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert _mapping_of(weight.data_ptr())[1] <= 8  # at most the two pages it shares with its neighbours
