"""The offline backend: an OpenAI-compatible server over real small models (see `llmlab.local.server`)."""

import contextlib
import ctypes
import sys
import warnings

# peft reads transformers' deprecated `is_gradient_checkpointing` each time it wraps a model (training a
# LoRA, loading an adapter): a warning the learner can do nothing about, printed into notebook outputs.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)


def _return_freed_memory_to_the_os() -> None:
    """Fix glibc's mmap threshold at its 128 KiB default.

    glibc raises the threshold each time a large block is freed, so that tensors of a few hundred KiB (KV
    caches, training activations) end up in heaps that never shrink. Measured (bench_server's memory
    child): peak RSS of serving + a LoRA job 1,650 MB by default, 1,490 MB with the threshold fixed; speed
    is unchanged within noise. Binder gives a learner 1-2 GB, so this matters.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, ...): nothing to fix
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


_return_freed_memory_to_the_os()
