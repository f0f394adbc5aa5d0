"""The frozen model a LoRA job trains on where the ONNX engine serves (the torch model is not loaded to serve):
built from the same float weight cache, its matrices fp32, or bf16 with `LLMLAB_TRAINING_BF16=1` where the CPU
multiplies bf16 in hardware (same step time here, but notebook 02b's format fine-tune then kept 4 of 8 general
answers, not 6: opt-in until measured on more runs); its outputs fp32. Freed when the job ends.

On Linux the fp32 matrices are not copied: they are memory-mapped from the weight cache (copy-on-write, never
written) and each matrix's pages leave the process's resident memory after each use (`madvise(MADV_DONTNEED)`;
they stay in the page cache, and the next use maps them again). A job beside the ONNX engine then holds about
one matrix of them resident instead of ~540 MB: the server's peak with a tutorial job went from 1,565 to
1,153 MB (bench/bench_backend.py --memory-only), the same losses, for a few % more time per step.

>>> model = bf16_training_model(runtime)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmlab.local.memory_limit import pages_let_go
from llmlab.local.weights import build_weight_cache, mapped_tensor, safetensors_header

_LIBC = ctypes.CDLL(None) if pages_let_go({}) else None  # madvise with Linux's semantics
_MADV_DONTNEED = 4


class _Bf16Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is stored in bf16 (or fp32): its input is cast to that, its output is fp32."""

    mapped = False  # its weight is memory-mapped from the weight cache: its pages are let go after each use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Bf16Matmul.apply(x, self.weight, self.mapped)


class _Bf16Embedding(torch.nn.Embedding):
    """A frozen embedding stored in bf16 whose looked-up rows are fp32."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight).float()


_ROWS = 4096  # rows of an fp32 matrix read from the weight cache at once (the LM head has 49,152)


class _Bf16Matmul(torch.autograd.Function):
    """`x @ weight.T` with a frozen bf16 `weight`, multiplied in bf16 (fp32 accumulation; a cast of the weight
    to fp32 at every use made a step 2.5x slower), the result fp32; only the gradient of `x` is computed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, mapped: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.mapped = mapped
        out = (x.to(weight.dtype) @ weight.T).float()
        if mapped:
            _let_go(weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        out = (grad.to(weight.dtype) @ weight).float()
        if ctx.mapped:
            _let_go(weight)
        return out, None, None


def _let_go(weight: torch.Tensor) -> None:
    """Unmap the pages of a frozen weight memory-mapped copy-on-write and never written (`madvise(MADV_DONTNEED)`):
    they leave the process's resident memory and stay in the page cache, from which the next use maps them
    again (a minor fault each). Only the pages wholly inside the tensor are let go."""
    page = mmap.PAGESIZE
    start = -(-weight.data_ptr() // page) * page
    end = (weight.data_ptr() + weight.nbytes) // page * page
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX, Arm's BF16 extension); elsewhere
    a bf16 product is emulated and can be several times slower than fp32. `cpuinfo`: Linux's /proc/cpuinfo text.

    >>> native_bf16("flags : fpu avx2 avx512f"), native_bf16("flags : avx512f avx512_bf16")
    (False, True)
    """
    import re
    import subprocess
    import sys

    try:
        if cpuinfo is None and sys.platform == "darwin":
            found = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True
            )
            return found.stdout.strip() == "1"
        if cpuinfo is None:
            cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo) is not None


def _read_float_tensors(
    path: Path, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor]]:
    """The fp32 tensors of a safetensors file, read (bf16, or where pages cannot be let go: mapped pages would
    stay resident) and converted one at a time: 2-D ones to `dtype`, the rest (norms) kept fp32."""
    with open(path, "rb") as f:
        header, start = safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] != "F32":
                raise ValueError(f"{path}: {name} is {info['dtype']}, not F32")
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            shape = info["shape"]
            if len(shape) != 2:
                yield (
                    name,
                    torch.frombuffer(bytearray(f.read(end - begin)), dtype=torch.float32).reshape(shape),
                )
                continue
            out = torch.empty(shape, dtype=dtype)
            per_row = shape[1] * 4
            for row in range(0, shape[0], _ROWS):
                rows = min(_ROWS, shape[0] - row)
                block = torch.frombuffer(bytearray(f.read(rows * per_row)), dtype=torch.float32)
                out[row : row + rows] = block.reshape(rows, shape[1])
            yield name, out


def _mapped_float_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The fp32 tensors of a safetensors file, memory-mapped copy-on-write (no copy; pages read when used)."""
    with open(path, "rb") as f:
        header, _ = safetensors_header(f)
    for name in header:
        if name != "__metadata__":
            yield name, torch.from_numpy(mapped_tensor(path, name))


def bf16_training_model(runtime: Any, dtype: torch.dtype | None = None) -> Any:
    """A frozen `LlamaForCausalLM` of `runtime`'s float weight cache with its matrices in bf16 (~270 MB, not
    ~540 MB) and fp32 outputs; for training where the torch model is not loaded to serve. `dtype`: the
    matrices' type; None: bf16 when `LLMLAB_TRAINING_BF16=1` and the CPU multiplies it in hardware (`native_bf16`),
    else fp32.

    >>> model = bf16_training_model(runtime)  # doctest: +SKIP
    >>> model.lm_head.weight.dtype, model.model.norm.weight.dtype  # doctest: +SKIP
    (torch.bfloat16, torch.float32)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = build_weight_cache(runtime.home)
    config = AutoConfig.from_pretrained(cache)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters())
    if dtype is None:
        wanted = os.environ.get("LLMLAB_TRAINING_BF16") == "1"
        dtype = torch.bfloat16 if wanted and native_bf16() else torch.float32
    # fp32 on Linux: the weights are memory-mapped and each matrix's pages let go after each use (`_let_go`),
    # so a step holds about one matrix of them resident, not ~540 MB (the rest stays in the page cache)
    mapped = dtype == torch.float32 and _LIBC is not None
    if mapped:
        tensors = _mapped_float_tensors(cache / "model.safetensors")
    else:
        tensors = _read_float_tensors(cache / "model.safetensors", dtype)
    for name, tensor in tensors:
        params.pop(name)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    if [name for name in params if name != "lm_head.weight"] or not config.tie_word_embeddings:
        raise RuntimeError(f"the weight cache {cache} lacks {sorted(params)}")
    model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)  # its buffers are computed, not stored
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = _Bf16Linear
            module.mapped = mapped
        elif type(module) is torch.nn.Embedding:
            module.__class__ = _Bf16Embedding
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("bf16_training_model: some weights were not loaded")
    return model.requires_grad_(False).eval()
