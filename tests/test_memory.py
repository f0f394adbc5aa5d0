"""What keeps the server's memory down (issue #15: all of the kit's processes under 1.5 GB with two kernels and
a fine-tune running; measured in bench/bench_backend.py). Each fix keeps the results the same."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from llmlab.local.runtime import EmbeddingRuntime


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
        "import sys; from llmlab.local.runtime import EmbeddingRuntime; EmbeddingRuntime().embed(['x']); "
        "print('sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
