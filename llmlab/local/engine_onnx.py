"""The chat model on ONNX Runtime GenAI, int8: the fast engine, the default where `onnxruntime-genai` imports
(`LLMLAB_ENGINE=torch` forces the torch one; `llmlab doctor --build-cache`, run by `make setup`, builds it).

>>> engine = OnnxEngine(build_onnx_model(home))  # doctest: +SKIP
>>> logits, advance = engine.start([1, 9690, 198], max_length=64)  # doctest: +SKIP
>>> logits.shape  # doctest: +SKIP
torch.Size([1, 49152])

The model is built once from the float weight cache by ONNX Runtime GenAI's own model builder (~25 s) into
`home/weights/SmolLM2-135M-Instruct-onnx-uint8-lora-r0/`, beside the float weights it derives from (a home whose
`weights/` links to a shared cache shares it too). int8, not int4: the builder's int4 makes the 135M model
loop on greedy decoding (issue 16). Every decoder projection then gets a LoRA branch whose two matrices are
model inputs (`add_lora_inputs`), of rank 0 by default: a fine-tuned model is a peft adapter exported to ONNX
Runtime's adapter format in ~0.1 s (`export_adapter`) and switched per request on the one loaded model; the
rank-0 branch costs the base model no measurable decode speed. (A merged int8 model per fine-tuned model would
take the builder's ~25 s and ~270 MB of memory each.)

The engine only turns token ids into next-token logits; sampling, constrained decoding, stop strings,
streaming and log-probs stay in `ChatRuntime`, shared with the torch path. Its prompt cache is the KV states
of the last few generators: a prompt that starts like an earlier one (same adapter) rewinds that generator
to the shared prefix and reads only the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.local.memory_limit import memory_is_tight

_log = logging.getLogger(__name__)
ENGINES = ("torch", "onnx")
SHARED_KV = 2048  # tokens: 94 MB of KV states
MIN_REUSE = 16  # a cached prefix shorter than this is not worth a rewind
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
    installed and memory is not tight, and "torch" where it is not installed or where memory is tight (under
    4 GiB, as on Binder: a LoRA job shares torch's weights, while the ONNX model would sit beside them).

    >>> engine_name({"LLMLAB_ENGINE": "torch"}), engine_name({"LLMLAB_ENGINE": " ONNX "})
    ('torch', 'onnx')
    >>> engine_name({"MEM_LIMIT": str(2 * 2**30)})
    'torch'
    """
    name = (environ.get("LLMLAB_ENGINE") or "").strip().lower()
    if not name:
        return "onnx" if onnx_available() and not memory_is_tight(environ) else "torch"
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


def build_onnx_model(home: str | os.PathLike | None = None) -> Path:
    """The int8 ONNX chat model's folder (with LoRA inputs) under `home` (default `llmlab_home()`), built
    first if missing. The float weight cache is built first if needed; the folder appears complete or not at all.

    >>> build_onnx_model().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct-onnx-uint8-lora-r0'
    """
    from llmlab.local.weights import build_folder_atomically, build_weight_cache
    from llmlab.models import CHAT_MODEL_ID
    from llmlab.paths import llmlab_home

    home = Path(home) if home is not None else llmlab_home()
    target = home / "weights" / f"{CHAT_MODEL_ID}-onnx-uint8-lora-r0"
    if not (target / "genai_config.json").is_file():
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
    from safetensors.torch import load_file

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


def _packed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """One branch for modules that share an input: their A side by side, their B block-diagonal.

    >>> a, b = _packed([(torch.ones(4, 2), torch.ones(2, 3)), (torch.ones(4, 2), torch.ones(2, 5))])
    >>> a.shape, b.shape, float(b[:2, 3:].sum())
    ((4, 4), (4, 8), 0.0)
    """
    a = np.ascontiguousarray(np.concatenate([p[0].float().numpy() for p in pairs], axis=1), dtype=np.float32)
    b = np.zeros((a.shape[1], sum(p[1].shape[1] for p in pairs)), np.float32)
    row = col = 0
    for _, part in pairs:
        b[row : row + part.shape[0], col : col + part.shape[1]] = part.float().numpy()
        row, col = row + part.shape[0], col + part.shape[1]
    return a, b


@dataclass
class _Kept:
    adapter: str | None
    generator: Any
    capacity: int  # the most tokens it can hold
    read: int  # its first tokens, read as a prompt (the later ones were decoded one by one)


class OnnxEngine:
    """Next-token logits of the int8 ONNX model with per-request LoRA adapters, one sequence at a time (the
    caller holds a lock).

    `threads`: ONNX Runtime's intra-op threads (the runtime passes `torch_threads()`). `keep`: how many
    generators (their KV states) are kept for prompts that start like an earlier one; 0 reads every prompt
    in full. Each holds up to `SHARED_KV` tokens (94 MB) or what its request needed.
    """

    def __init__(self, folder: str | os.PathLike, threads: int = 1, keep: int = 2) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise RuntimeError(
                "LLMLAB_ENGINE=onnx needs onnxruntime-genai (pip install 'llmlab[local]'; it has no wheel for "
                "Intel Macs): install it, or unset LLMLAB_ENGINE to fall back to torch"
            ) from exc

        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        # no spinning between ops: on a busy machine (CI, Binder, training beside serving) two spinning
        # threads measured 17-22 tok/s decode vs 31-38 without (1 thread: no difference)
        options = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._og = og
        self.model = og.Model(config)
        self.layers = int(
            json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"][
                "num_hidden_layers"
            ]
        )
        self._adapters = og.Adapters(self.model)
        self._loaded: set[str] = set()
        self.keep = keep
        self._kept: list[_Kept] = []  # least recently used first

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Make the peft LoRA adapter in `adapter_dir` usable as `adapter=name`; `AdapterError` if it cannot be."""
        path = export_adapter(adapter_dir, self.layers)
        try:
            self._adapters.load(str(path), name)
        except Exception as exc:  # onnxruntime-genai raises a bare RuntimeError
            raise AdapterError(f"the adapter in {adapter_dir} is unreadable: {exc}") from exc
        self._loaded.add(name)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` and the KV states computed with it."""
        if name in self._loaded:
            self._kept = [k for k in self._kept if k.adapter != name]
            self._adapters.unload(name)
            self._loaded.discard(name)

    # -- reading and decoding --------------------------------------------------------------------------------
    def _generator(self, ids: list[int], max_length: int, adapter: str | None, keep: int) -> tuple[Any, int]:
        """A generator holding the longest kept prefix of `ids` with room for `max_length` tokens, and that
        prefix's length (0: a new generator); `ids` are then read from there.

        int8 logits of a token read alone differ from those of a token read with others (up to ~0.3), so only
        tokens read as part of a prompt are reused, and at least two tokens are read: a warm request gives
        exactly the logits of a cold one (a seed reproduces its sample)."""
        best, length = None, 0
        for kept in self._kept:
            if kept.adapter == adapter and kept.capacity >= max_length:
                held = kept.generator.get_sequence(0)
                n = min(kept.read, len(held), len(ids) - max(keep, 2))
                mismatch = np.flatnonzero(np.asarray(held[:n]) != np.asarray(ids[:n]))
                n = int(mismatch[0]) if mismatch.size else n
                if n > length:
                    best, length = kept, n
        if best is not None and length >= MIN_REUSE:
            self._kept.remove(best)
            self._kept.append(best)
            best.generator.rewind_to(length)
            best.read = len(ids)
            return best.generator, length
        capacity = max(max_length, SHARED_KV) if self.keep else max_length
        params = self._og.GeneratorParams(self.model)
        # up to SHARED_KV tokens the KV states live in one buffer allocated up front; beyond, they grow as
        # needed: a request without `max_tokens` (room for the whole 8,192-token context) would otherwise
        # allocate ~350 MB and 0.3 s up front, at about the same decode speed over a few hundred tokens
        params.set_search_options(
            max_length=capacity, do_sample=False, past_present_share_buffer=capacity <= SHARED_KV
        )
        generator = self._og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self._adapters, adapter)
        if self.keep:
            self._kept.append(_Kept(adapter, generator, capacity, len(ids)))
            del self._kept[: -self.keep]
        return generator, 0

    def start(
        self, ids: list[int], max_length: int, adapter: str | None = None, keep: int = 1
    ) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """Read the prompt `ids` with `adapter` (None: the base model); (the next-token logits of its last
        `keep` positions, (keep, vocab); `advance`), where `advance(token)` reads one more token and gives the
        logits after it, (vocab,). `max_length`: prompt plus generated tokens, at most.

        A kept generator that holds a prefix of `ids` is rewound to it: only the rest is read."""
        if adapter is not None and adapter not in self._loaded:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        generator, done = self._generator(ids, max_length, adapter, keep)
        generator.append_tokens(ids[done:])
        # all positions' logits only when asked for: a long prompt's are ~200 KB per token
        last = generator.get_logits()[0, -1:] if keep == 1 else generator.get_output("logits")[0, -keep:]
        first = torch.from_numpy(last.astype("float32", copy=True))

        def advance(token: int) -> torch.Tensor:
            generator.append_tokens([token])
            return torch.from_numpy(generator.get_logits()[0, -1].astype("float32", copy=True))

        return first, advance
