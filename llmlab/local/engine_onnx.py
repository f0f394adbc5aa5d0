"""The chat model on ONNX Runtime GenAI, int8: the fast engine, the default where `onnxruntime-genai` imports
(`LLMLAB_ENGINE=torch` forces the torch one; `llmlab doctor --build-cache`, run by `make setup`, builds it).

>>> engine = OnnxEngine(build_onnx_model(home))  # doctest: +SKIP
>>> logits, advance = engine.start([1, 9690, 198])  # doctest: +SKIP
>>> logits.shape, advance(28).shape  # doctest: +SKIP
((1, 49152), (49152,))

The model is built once from the float weight cache by ONNX Runtime GenAI's own model builder (~25 s) into
`home/weights/SmolLM2-135M-Instruct-onnx-uint8-lora-r0/`, beside the float weights it derives from (a home whose
`weights/` links to a shared cache shares it too). int8, not int4: the builder's int4 makes the 135M model
loop on greedy decoding (issue 16). Every decoder projection then gets a LoRA branch whose two matrices are
model inputs (`add_lora_inputs`), of rank 0 by default: a fine-tuned model is a peft adapter exported to ONNX
Runtime's adapter format in ~0.1 s (`export_adapter`) and switched per request on the one loaded model; the
rank-0 branch costs the base model no measurable decode speed. (A merged int8 model per fine-tuned model would
take the builder's ~25 s and ~270 MB of memory each.)

The builder's model is then run by ONNX Runtime itself (an `InferenceSession`, not ONNX Runtime GenAI's
generator, which decodes one batch of equal-length prompts at a time): each prompt is read alone, and the
sequences being decoded at the same time are read together, one forward pass per step (`batching`).
The engine only turns token ids into next-token logits (numpy arrays: serving on it never imports torch);
sampling, constrained decoding, stop strings, streaming and log-probs stay in `ChatRuntime`, shared with the
torch path. Its prompt cache is the KV states of the last few prompts: a prompt that starts like an earlier
one (same adapter) reads only the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.local.memory_limit import memory_is_tight, pages_let_go

_log = logging.getLogger(__name__)
ENGINES = ("torch", "onnx")
MIN_REUSE = 16  # a kept prefix shorter than this is not worth reusing
KEPT_TOKENS = 2048  # a longer prompt's KV states (46 KB a token) are not kept
# the kept prompts' tokens in all (~380 MB at most, reached only with many long prompts in flight): eight
# requests with ~800-token prompts (a RAG context and tools) each find their own prompt still kept when their
# next read comes (a tool_choice "auto" decision reads the prompt, then the answer starts from it). With two
# prompts kept, or any budget under the eight prompts (least recently used out, each read pushes out the
# next one needed), each was read twice: 07's hybrid ran 1.8x slower eight at a time than one by one
KEPT_BUDGET = 8192
KEPT_BUDGET_TIGHT = (
    2048  # where memory is tight (Binder): ~94 MB at most, the torch engine's prompt cache too
)


def kept_budget(environ: Mapping[str, str] = os.environ) -> int:
    """Tokens of prompts' KV states the engine keeps: `KEPT_BUDGET`, or `KEPT_BUDGET_TIGHT` where memory is tight.

    >>> kept_budget({"MEM_LIMIT": str(2 * 2**30)}), kept_budget({"MEM_LIMIT": str(16 * 2**30)})
    (2048, 8192)
    """
    return KEPT_BUDGET_TIGHT if memory_is_tight(environ) else KEPT_BUDGET


# the projections of each decoder layer as the builder names them -> the peft modules they hold, in order
# (the builder packs q, k and v into one MatMul)
PROJECTIONS = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_proj": ("mlp.gate_proj",),
    "up_proj": ("mlp.up_proj",),
    "down_proj": ("mlp.down_proj",),
}
ADAPTER_FILE = "adapter.onnx_adapter"  # beside the peft adapter it is exported from


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served (missing, unreadable or of an unsupported kind)."""

    @classmethod
    def unreadable(cls, folder: str | os.PathLike, exc: Exception) -> AdapterError:
        """The error for an adapter whose files could not be read (`exc` says why), on either engine."""
        return cls(f"the adapter in {folder} is unreadable: {type(exc).__name__}: {exc}")


def onnx_available() -> bool:
    """Whether `onnxruntime_genai` imports here (it has wheels for Linux, Windows and Apple silicon)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def engine_name(environ: Mapping[str, str] = os.environ) -> str:
    """The chat engine: `$LLMLAB_ENGINE` ("torch" or "onnx") when set, else "onnx" where onnxruntime-genai is
    installed, and "torch" where it is not, or where memory is tight (under 4 GiB, as on Binder) and a LoRA job
    beside the ONNX model could not let its weights' pages go (`memory_limit.pages_let_go`: not Linux, or bf16
    training asked for); torch's weights a job shares.

    >>> engine_name({"LLMLAB_ENGINE": "torch"}), engine_name({"LLMLAB_ENGINE": " ONNX "})
    ('torch', 'onnx')
    >>> engine_name({"MEM_LIMIT": str(2 * 2**30), "LLMLAB_TRAINING_BF16": "1"})
    'torch'
    """
    name = (environ.get("LLMLAB_ENGINE") or "").strip().lower()
    if not name:
        tight = memory_is_tight(environ) and not pages_let_go(environ)
        return "onnx" if onnx_available() and not tight else "torch"
    if name not in ENGINES:
        raise ValueError(f"LLMLAB_ENGINE must be one of {', '.join(ENGINES)}, not {name!r}")
    return name


def _run_builder(weights: Path, out: Path) -> None:
    """ONNX Runtime GenAI's model builder: int8 weights for CPU from the float safetensors in `weights`.

    Asymmetric (uint8 with a zero point per block of 32): the float weights are the GGUF's 4-bit values with
    a minimum per block, which an asymmetric grid follows more closely; measured against fp32 (teacher-forced)
    it kept the sign of two near-tied greedy choices that symmetric int8 flipped, at the same speed and size.

    Its output is kept quiet (hundreds of progress lines); on failure the last lines are in the error."""
    work = out / ".builder-cache"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(weights), "-o", str(out)]
    command += ["-p", "int8", "-e", "cpu", "-c", str(work), "--extra_options", "is_symmetric=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"building the ONNX model failed (exit {done.returncode}):\n{tail}")
    shutil.rmtree(work, ignore_errors=True)


def add_lora_inputs(folder: Path) -> int:
    """Give every decoder projection of the built model in `folder` a LoRA branch `y += (x @ A) @ B`, with
    `A` (in, rank) and `B` (rank, out) model inputs named `lora.<layer>.<projection>.A/.B`, of rank 0 by
    default (a base-model request decodes as fast as without the branches; rank-1 zeros cost ~5%), any rank
    when fed. Rewrites `model.onnx` (the weights file is untouched); returns the number of
    branches.

    >>> add_lora_inputs(folder_built_by_the_builder)  # doctest: +SKIP
    150
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph, nodes, branches = model.graph, [], 0
    for node in graph.node:
        nodes.append(node)
        parts = node.name.split("/")  # /model/layers.3/attn/qkv_proj/MatMul_Q8
        if node.op_type != "MatMulNBits" or len(parts) < 5 or parts[4] not in PROJECTIONS:
            continue
        size = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        name = f"lora.{parts[2].split('.')[1]}.{parts[4]}"
        for suffix, shape, default in (
            (".A", [size["K"], "lora_rank"], (size["K"], 0)),
            (".B", ["lora_rank", size["N"]], (0, size["N"])),
        ):
            graph.input.append(helper.make_tensor_value_info(name + suffix, TensorProto.FLOAT, shape))
            graph.initializer.append(numpy_helper.from_array(np.zeros(default, np.float32), name + suffix))
        out = node.output[0]
        node.output[0] = f"{name}/base"
        nodes += [
            helper.make_node("MatMul", [node.input[0], f"{name}.A"], [f"{name}/xa"], name=f"{name}/MatMulA"),
            helper.make_node("MatMul", [f"{name}/xa", f"{name}.B"], [f"{name}/xab"], name=f"{name}/MatMulB"),
            helper.make_node("Add", [f"{name}/base", f"{name}/xab"], [out], name=f"{name}/Add"),
        ]
        branches += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return branches


def _build(weights: Path, out: Path) -> None:
    _run_builder(weights, out)
    if add_lora_inputs(out) == 0:
        raise RuntimeError("building the ONNX model failed: no projection to give a LoRA branch")


def onnx_model_folder(home: str | os.PathLike | None = None) -> Path:
    """Where the int8 ONNX chat model of `home` (default `llmlab_home()`) is, or is to be, built.

    >>> onnx_model_folder("/h").as_posix()
    '/h/weights/SmolLM2-135M-Instruct-onnx-uint8-lora-r0'
    """
    from llmlab.models import CHAT_MODEL_ID
    from llmlab.paths import llmlab_home

    return (
        (Path(home) if home is not None else llmlab_home())
        / "weights"
        / f"{CHAT_MODEL_ID}-onnx-uint8-lora-r0"
    )


def onnx_model_built(home: str | os.PathLike | None = None) -> bool:
    """Whether the int8 ONNX chat model of `home` is built (a folder appears complete or not at all)."""
    return (onnx_model_folder(home) / "genai_config.json").is_file()


def build_onnx_model(home: str | os.PathLike | None = None) -> Path:
    """The int8 ONNX chat model's folder (with LoRA inputs) under `home` (default `llmlab_home()`), built
    first if missing. The float weight cache is built first if needed; the folder appears complete or not at all.

    >>> build_onnx_model().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct-onnx-uint8-lora-r0'
    """
    from llmlab.local.weights import build_folder_atomically, build_weight_cache

    target = onnx_model_folder(home)
    if not onnx_model_built(home):
        weights = build_weight_cache(home)
        _log.warning(
            "building the int8 ONNX chat model in %s (once, ~30 s; `make setup` does it ahead)", target
        )
        started = time.monotonic()
        build_folder_atomically(target, lambda tmp: _build(weights, tmp))
        _log.warning("built the int8 ONNX chat model in %.0f s", time.monotonic() - started)
    return target


def export_adapter(adapter_dir: str | os.PathLike, layers: int) -> Path:
    """The peft LoRA adapter in `adapter_dir` as the ONNX model's LoRA inputs, in ONNX Runtime's adapter format:
    `adapter_dir/adapter.onnx_adapter`, written first if missing or older than the adapter (~0.1 s, atomically).

    q, k and v share one packed branch: A = [A_q A_k A_v], B = their B's block-diagonal, scaled by alpha/r.
    `AdapterError` names what is wrong with an adapter that cannot be served.

    >>> export_adapter(home / "adapters" / "ftjob-abc", layers=30).name  # doctest: +SKIP
    'adapter.onnx_adapter'
    """
    import onnxruntime as ort
    from safetensors.numpy import load_file  # not torch's: serving a fine-tuned model needs no torch

    folder = Path(adapter_dir)
    weights, target = folder / "adapter_model.safetensors", folder / ADAPTER_FILE
    try:
        if target.is_file() and target.stat().st_mtime_ns >= weights.stat().st_mtime_ns:
            return target
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except Exception as exc:  # a missing file, a damaged header (safetensors' own error type), bad JSON
        raise AdapterError.unreadable(folder, exc) from exc
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern"):
        raise AdapterError(f"the adapter in {folder} is not a plain LoRA adapter (DoRA or per-module ranks)")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    params: dict[str, Any] = {}
    found = 0
    for layer in range(layers):
        for projection, modules in PROJECTIONS.items():
            pairs = []
            for module in modules:
                key = f"base_model.model.model.layers.{layer}.{module}"
                if f"{key}.lora_A.weight" in tensors:
                    pairs.append(
                        (tensors[f"{key}.lora_A.weight"].T, tensors[f"{key}.lora_B.weight"].T * scale)
                    )
            if not pairs:
                continue
            if len(pairs) != len(modules):
                raise AdapterError(f"the adapter in {folder} adapts only some of {', '.join(modules)}")
            found += len(pairs)
            a, b = _packed(pairs)
            params[f"lora.{layer}.{projection}.A"] = ort.OrtValue.ortvalue_from_numpy(a)
            params[f"lora.{layer}.{projection}.B"] = ort.OrtValue.ortvalue_from_numpy(b)
    if not found or found != sum(1 for k in tensors if k.endswith(".lora_A.weight")):
        raise AdapterError(f"the adapter in {folder} has LoRA weights for modules this model does not have")
    adapter = ort.AdapterFormat()
    adapter.set_parameters(params)
    tmp = folder / f".{ADAPTER_FILE}.{os.getpid()}"
    adapter.export_adapter(str(tmp))
    os.replace(tmp, target)
    return target


def _packed(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One branch for modules that share an input: their A side by side, their B block-diagonal.

    >>> a, b = _packed([(np.ones((4, 2)), np.ones((2, 3))), (np.ones((4, 2)), np.ones((2, 5)))])
    >>> a.shape, b.shape, float(b[:2, 3:].sum())
    ((4, 4), (4, 8), 0.0)
    """
    a = np.ascontiguousarray(np.concatenate([p[0] for p in pairs], axis=1), dtype=np.float32)
    b = np.zeros((a.shape[1], sum(p[1].shape[1] for p in pairs)), np.float32)
    row = col = 0
    for _, part in pairs:
        b[row : row + part.shape[0], col : col + part.shape[1]] = part
        row, col = row + part.shape[0], col + part.shape[1]
    return a, b


@dataclass
class _Kept:
    adapter: str | None
    ids: list[int]
    kv: list[np.ndarray]  # key, value per layer: (1, kv_heads, len(ids), head_size), as read from the prompt


class OnnxEngine:
    """Next-token logits of the int8 ONNX model with per-request LoRA adapters; thread-safe, and sequences
    decoded at the same time are read together (`batching.Scheduler`: one forward pass per step).

    `threads`: ONNX Runtime's intra-op threads (the runtime passes `cpu_limit.engine_threads()`). `budget`: how many
    tokens of recent prompts' KV states (default `kept_budget()`; up to `KEPT_TOKENS` a prompt) are kept, least
    recently used out, for prompts that start like an earlier one; 0 reads every prompt in full.
    `scheduler.peak`: the most sequences decoded in one step so far.
    """

    def __init__(self, folder: str | os.PathLike, threads: int = 1, budget: int | None = None) -> None:
        import onnxruntime as ort

        from llmlab.local.batching import Scheduler

        config = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # no spinning between ops: on a busy machine (CI, Binder, training beside serving) two spinning
        # threads measured 17-22 tok/s decode vs 31-38 without (1 thread: no difference)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # not a warning per LoRA input ("initializer appears in graph inputs")
        self._ort = ort
        self.session = ort.InferenceSession(
            str(Path(folder) / config["filename"]), options, providers=["CPUExecutionProvider"]
        )
        self.layers = int(config["num_hidden_layers"])
        self._kv_shape = (int(config["num_key_value_heads"]), int(config["head_size"]))
        self._lock = threading.Lock()  # around every run of the session
        self.scheduler = Scheduler(self.session, self._lock, self.layers, *self._kv_shape)
        self._adapters: dict[str | None, dict[str, Any]] = {None: {}}  # name -> its LoRA inputs (OrtValues)
        self.budget = kept_budget() if budget is None else budget
        self._kept: list[_Kept] = []  # least recently used first

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Make the peft LoRA adapter in `adapter_dir` usable as `adapter=name`; `AdapterError` if it cannot be."""
        path = export_adapter(adapter_dir, self.layers)
        try:
            self._adapters[name] = self._ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:  # onnxruntime raises a bare RuntimeError
            raise AdapterError(f"the adapter in {adapter_dir} is unreadable: {exc}") from exc

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` and the KV states computed with it (a sequence decoding with it finishes)."""
        with self._lock:
            self._kept = [k for k in self._kept if k.adapter != name]
            if name is not None:
                self._adapters.pop(name, None)

    # -- reading and decoding --------------------------------------------------------------------------------
    def _prefix(self, ids: list[int], adapter: str | None, keep: int) -> tuple[list[np.ndarray] | None, int]:
        """The KV states of the longest kept prompt prefix of `ids` (at least `MIN_REUSE` tokens) and its
        length, or (None, 0). Call with the lock held.

        int8 logits of a token read alone differ from those of a token read with others (up to ~0.3), so only
        tokens read as part of a prompt are kept, and at least two tokens are read: a warm request gives
        exactly the logits of a cold one (a seed reproduces its sample)."""
        best, length = None, 0
        for kept in self._kept:
            if kept.adapter == adapter:
                n = min(len(kept.ids), len(ids) - max(keep, 2))
                mismatch = np.flatnonzero(np.asarray(kept.ids[:n]) != np.asarray(ids[:n]))
                n = int(mismatch[0]) if mismatch.size else n
                if n > length:
                    best, length = kept, n
        if best is None or length < MIN_REUSE:
            return None, 0
        self._kept.remove(best)
        self._kept.append(best)
        return [np.ascontiguousarray(states[:, :, :length]) for states in best.kv], length

    def _read(
        self, ids: list[int], adapter: str | None, keep: int
    ) -> tuple[np.ndarray, list[np.ndarray], int]:
        """Read the prompt `ids` after its longest kept prefix: (the logits of its last `keep` positions, its
        KV states, how many tokens came from the kept prefix)."""
        heads, size = self._kv_shape
        with self._lock:
            past, done = self._prefix(ids, adapter, keep)
            past = past or [np.zeros((1, heads, 0, size), np.float32)] * (2 * self.layers)
            feeds = {
                "input_ids": np.asarray([ids[done:]], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64),
            }
            feeds.update(zip(self.scheduler.past_names, past, strict=True))
            feeds.update(self._adapters[adapter])
            logits, *kv = self.session.run(["logits", *self.scheduler.present_names], feeds)
            self._remember(_Kept(adapter, list(ids), kv))
        return logits[0, -keep:], kv, done

    def _remember(self, new: _Kept) -> None:
        """Keep `new` in place of the kept prompts it starts with, unless a kept prompt starts with it; then
        drop the least recently used until the budget holds. Call with the lock held."""
        if not MIN_REUSE <= len(new.ids) <= min(KEPT_TOKENS, self.budget):
            return
        mine = [k for k in self._kept if k.adapter == new.adapter]
        if any(k.ids[: len(new.ids)] == new.ids for k in mine):
            return  # a kept one already holds all of it
        self._kept = [k for k in self._kept if k.adapter != new.adapter or new.ids[: len(k.ids)] != k.ids]
        self._kept.append(new)
        while sum(len(k.ids) for k in self._kept) > self.budget:
            self._kept.pop(0)

    def start(
        self, ids: list[int], adapter: str | None = None, keep: int = 1
    ) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
        """Read the prompt `ids` with `adapter` (None: the base model); (the next-token logits of its last
        `keep` positions, (keep, vocab); `advance`), where `advance(token)` reads one more token and gives the
        logits after it, (vocab,), decoded in one batch with the other running sequences (`advance.close()`
        or dropping it ends the sequence). Its KV states grow as it does.

        A kept prompt that is a prefix of `ids` is not read again: only the rest is."""
        if adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        lora = self._adapters[adapter]
        logits, kv, _ = self._read(ids, adapter, keep)
        return logits.astype(np.float32, copy=True), self.scheduler.sequence(lora, kv, len(ids))
