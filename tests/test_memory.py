"""What keeps the server's memory down (issue #15: all of the kit's processes under 1.5 GB with two kernels and
a fine-tune running; measured in bench/bench_backend.py). Each fix keeps the results the same."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llmlab.local.embedding_runtime import EmbeddingRuntime


def test_embeddings_match_sentence_transformers_without_importing_it():
    """The server computes MiniLM's embeddings with transformers alone (sentence-transformers' import alone
    cost the server ~190 MB of resident memory): the same vectors, for batches with padding and truncation."""
    from sentence_transformers import SentenceTransformer

    from llmlab.models import minilm_path

    texts = ["How many days of leave do I get?", "hi", "", "word " * 400] + [
        f"policy {i} " * i for i in range(70)
    ]
    ours = EmbeddingRuntime().embed(texts)
    theirs = SentenceTransformer(str(minilm_path()), device="cpu").encode(
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True
    )
    assert ours.shape == theirs.shape == (74, 384)
    assert np.abs(ours - theirs).max() < 1e-5
    code = (
        "import sys; from llmlab.local.embedding_runtime import EmbeddingRuntime; EmbeddingRuntime().embed(['x']); "
        "print('sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_checkpointing_follows_binders_limit_the_cgroup_or_the_switch(tmp_path):
    """MEM_LIMIT (JupyterHub, Binder), a cgroup v2 or v1 limit, or the machine's memory: under 4 GiB training
    checkpoints activations; `LLMLAB_ACTIVATION_CHECKPOINTING` overrides; a bad value is a clear error."""
    from llmlab.local.memory_limit import checkpointing_wanted, memory_limit_bytes

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    big = tmp_path / "meminfo"
    big.write_text("MemTotal:       25165824 kB\nMemFree: 1 kB\n")
    (v2 / "memory.max").write_text("max\n")  # a container without a limit
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    assert memory_limit_bytes({}, v2, big) == 24 * 2**30
    assert not checkpointing_wanted({}, cgroup=v2, meminfo=big)
    assert checkpointing_wanted({"MEM_LIMIT": "2147483648"}, cgroup=v2, meminfo=big)
    assert checkpointing_wanted({}, cgroup=v1, meminfo=big)
    (v2 / "memory.max").write_text("1073741824\n")
    assert memory_limit_bytes({}, v2, big) == 2**30 and checkpointing_wanted({}, cgroup=v2, meminfo=big)
    assert not checkpointing_wanted({"LLMLAB_ACTIVATION_CHECKPOINTING": "0"}, cgroup=v2, meminfo=big)
    assert checkpointing_wanted(
        {"LLMLAB_ACTIVATION_CHECKPOINTING": "on"}, cgroup=v1.parent / "none", meminfo=big
    )
    with pytest.raises(ValueError, match="LLMLAB_ACTIVATION_CHECKPOINTING must be"):
        checkpointing_wanted({"LLMLAB_ACTIVATION_CHECKPOINTING": "sometimes"})


def test_the_engine_reads_with_the_cores_the_cgroup_allows(tmp_path):
    """Binder's containers see the host's cores but get a CPU quota (cgroup v2 `cpu.max`, v1 `cfs_quota_us`):
    the ONNX engine takes as many threads as the quota allows, at most 4, unless LLMLAB_THREADS says."""
    import os

    from llmlab.local.cpu_limit import MAX_ENGINE_THREADS, available_cpus, engine_threads

    cores = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota
    assert available_cpus(v2) == cores == available_cpus(tmp_path / "none")
    assert engine_threads({}, v2) == min(cores, MAX_ENGINE_THREADS)
    (v2 / "cpu.max").write_text("100000 100000\n")  # one core
    assert available_cpus(v2) == 1 and engine_threads({}, v2) == 1
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a core: still one thread
    assert engine_threads({}, v2) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no quota
    assert available_cpus(v1) == cores
    assert engine_threads({"LLMLAB_THREADS": "3"}, v2) == 3
