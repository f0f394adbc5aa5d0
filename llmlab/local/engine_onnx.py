"""The chat model on ONNX Runtime GenAI, int8: the opt-in fast engine for plain generation (`LLMLAB_ENGINE=onnx`).

>>> engine = OnnxEngine(build_onnx_model(home))  # doctest: +SKIP
>>> logits, advance = engine.start([1, 9690, 198], max_length=64)  # doctest: +SKIP
>>> logits.shape  # doctest: +SKIP
torch.Size([49152])

The model is built once from the float weight cache by ONNX Runtime GenAI's own model builder (~25 s) into
`home/weights/SmolLM2-135M-Instruct-onnx-int8/`, beside the float weights it derives from (a home whose
`weights/` links to a shared cache shares it too). int8, not int4: the builder's int4 makes the 135M model
loop on greedy decoding (issue 16). The engine only turns token ids into next-token logits; sampling, stop
strings, streaming and log-probs stay in `ChatRuntime.stream`, shared with the torch path. LoRA adapters,
constrained decoding (tool calls, JSON modes) and `logprob()` still run on torch in `ChatRuntime`; the
engine has no prompt cache yet (every prompt is read in full).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

ENGINES = ("torch", "onnx")
SHARED_KV = 2048  # tokens: 94 MB of KV states


def engine_name(environ: Mapping[str, str] = os.environ) -> str:
    """The chat engine `$LLMLAB_ENGINE` asks for: "torch" (default) or "onnx".

    >>> engine_name({}), engine_name({"LLMLAB_ENGINE": " ONNX "})
    ('torch', 'onnx')
    """
    name = (environ.get("LLMLAB_ENGINE") or "torch").strip().lower()
    if name not in ENGINES:
        raise ValueError(f"LLMLAB_ENGINE must be one of {', '.join(ENGINES)}, not {name!r}")
    return name


def _run_builder(weights: Path, out: Path) -> None:
    """ONNX Runtime GenAI's model builder: int8 weights for CPU from the float safetensors in `weights`.

    Its output is kept quiet (hundreds of progress lines); on failure the last lines are in the error."""
    work = out / ".builder-cache"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(weights), "-o", str(out)]
    command += ["-p", "int8", "-e", "cpu", "-c", str(work)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"building the ONNX model failed (exit {done.returncode}):\n{tail}")
    shutil.rmtree(work, ignore_errors=True)


def build_onnx_model(home: str | os.PathLike | None = None) -> Path:
    """The int8 ONNX chat model's folder under `home` (default `llmlab_home()`), built first if missing.

    The float weight cache is built first if needed; the folder appears complete or not at all.

    >>> build_onnx_model().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct-onnx-int8'
    """
    from llmlab.local.runtime import build_folder_atomically, build_weight_cache
    from llmlab.models import CHAT_MODEL_ID
    from llmlab.paths import llmlab_home

    home = Path(home) if home is not None else llmlab_home()
    target = home / "weights" / f"{CHAT_MODEL_ID}-onnx-int8"
    if not (target / "genai_config.json").is_file():
        weights = build_weight_cache(home)
        build_folder_atomically(target, lambda tmp: _run_builder(weights, tmp))
    return target


class OnnxEngine:
    """Next-token logits of the int8 ONNX model, one sequence at a time (the caller holds a lock).

    `threads`: ONNX Runtime's intra-op threads (the runtime passes `torch_threads()`).
    """

    def __init__(self, folder: str | os.PathLike, threads: int = 1) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise RuntimeError(
                "LLMLAB_ENGINE=onnx needs onnxruntime-genai (pip install 'llmlab[local]'; it has no wheel for "
                "Intel Macs): install it or leave LLMLAB_ENGINE unset"
            ) from exc

        config = og.Config(str(folder))
        config.clear_providers()  # CPU
        # no spinning between ops: on a busy machine (CI, Binder, training beside serving) two spinning
        # threads measured 17-22 tok/s decode vs 31-38 without (1 thread: no difference)
        options = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._og = og
        self.model = og.Model(config)

    def start(self, ids: list[int], max_length: int) -> tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """Read the prompt `ids`; (its next-token logits, `advance`), where `advance(token)` reads one more
        token and gives the logits after it. `max_length`: prompt plus generated tokens, at most.

        Up to `SHARED_KV` tokens the KV states live in one buffer allocated for `max_length`; beyond, they grow
        as needed: a request without `max_tokens` (room for the whole 8,192-token context) would otherwise
        allocate ~350 MB and 0.3 s up front, at about the same decode speed over a few hundred tokens."""
        params = self._og.GeneratorParams(self.model)
        shared = max_length <= SHARED_KV
        params.set_search_options(max_length=max_length, do_sample=False, past_present_share_buffer=shared)
        generator: Any = self._og.Generator(self.model, params)

        def advance(token_ids: list[int]) -> torch.Tensor:
            generator.append_tokens(token_ids)
            return torch.from_numpy(generator.get_logits()[0, -1].astype("float32", copy=True))

        return advance(ids), lambda token: advance([token])
