"""Benchmark the export of a `VectorIndex` to Chroma (`llmlab.export.to_chroma`) and Chroma's answers against ours.

    python bench/bench_export.py [--n 100000] [--dim 384] [--queries 1000]

Vectors: unit vectors from a two-level mixture (topics, each with sub-topics, plus noise), so that they have
neighbourhoods as real embeddings do (i.i.d. Gaussians have none, and no HNSW index finds their neighbours).
Measures the export (records snapshot, then Chroma's ingestion and HNSW build in an embedded `PersistentClient`
on a temporary folder), the folder's size, Chroma's query speed, and its top-10 agreement with our exact search
(the fraction of our exact top-10 ids that Chroma returns), without and with a `where` filter. Chroma's HNSW
settings are its defaults unless ``--ef-search`` is given: it is fixed when the collection is created, because in
chromadb 1.5.9 ``collection.modify(configuration={"hnsw": {"ef_search": ...}})`` changes the stored setting but
not the searches of the running process (measured: at 10k vectors, ef_search 400 modified to 10 kept its recall).
No target: a figure a learner can read. Writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np

from llmlab.export import chroma_search, to_chroma
from llmlab.index import VectorIndex

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
WHERE = {"topic": {"$lt": 20}}  # 20 of the 100 topics: about a fifth of the vectors


def mixture(
    n: int, dim: int, seed: int, topics: int = 100, subtopics: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors and their topic numbers: topic direction + sub-topic offset + noise."""
    shape = np.random.default_rng(0)  # the same topics for the data and the queries
    centres = shape.standard_normal((topics, dim)).astype(np.float32)
    offsets = 0.8 * shape.standard_normal((topics, subtopics, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    topic, sub = rng.integers(0, topics, n), rng.integers(0, subtopics, n)
    x = centres[topic] + offsets[topic, sub] + 0.9 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), topic


def agreement(found: list, truth: list) -> float:
    return float(
        np.mean([len(set(f.ids) & set(t.ids)) / len(t.ids) for f, t in zip(found, truth, strict=True)])
    )


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument(
        "--ef-search", type=int, default=None, help="Chroma's hnsw ef_search (default: Chroma's)"
    )
    args = parser.parse_args()
    x, topic = mixture(args.n, args.dim, seed=1)
    q, _ = mixture(args.queries, args.dim, seed=2)

    index = VectorIndex(args.dim)
    start = time.perf_counter()
    index.add(x, texts=[f"text {i}" for i in range(args.n)], metadata=[{"topic": int(t)} for t in topic])
    add_s = time.perf_counter() - start
    truth, truth_where = index.search(q, k=K), index.search(q, k=K, where=WHERE)

    with tempfile.TemporaryDirectory(prefix="llmlab-bench-chroma-") as folder:
        client = chromadb.PersistentClient(path=folder)
        start = time.perf_counter()
        index.records()
        records_s = time.perf_counter() - start
        start = time.perf_counter()
        hnsw = None if args.ef_search is None else {"ef_search": args.ef_search}
        collection = to_chroma(index, client, "bench", hnsw=hnsw)
        export_s = time.perf_counter() - start
        size = folder_size(Path(folder))
        start = time.perf_counter()
        found = chroma_search(collection, q, k=K)
        batch_s = time.perf_counter() - start
        start = time.perf_counter()
        for v in q[: args.singles]:
            chroma_search(collection, v, k=K)
        single_s = time.perf_counter() - start
        chroma = {
            "hnsw": collection.configuration["hnsw"],
            "top10_agreement": agreement(found, truth),
            "top10_agreement_where": agreement(chroma_search(collection, q, k=K, where=WHERE), truth_where),
            "batch_qps": len(q) / batch_s,
            "single_qps": args.singles / single_s,
        }
        start = time.perf_counter()
        for v in q[: args.singles]:
            index.search(v, k=K)
        ours_single_qps = args.singles / (time.perf_counter() - start)
        start = time.perf_counter()
        index.search(q, k=K)
        ours_batch_qps = len(q) / (time.perf_counter() - start)

    result = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": K,
        "where": WHERE,
        "chromadb": chromadb.__version__,
        "load_average_at_end": os.getloadavg(),
        "ours_add_s": add_s,
        "records_s": records_s,
        "export_s": export_s,
        "export_vectors_per_s": args.n / export_s,
        "chroma_folder_mb": size / 1e6,
        "chroma": chroma,
        "ours_exact_single_qps": ours_single_qps,
        "ours_exact_batch_qps": ours_batch_qps,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2))
    print(
        f"{args.n:,} x {args.dim}: our exact index built in {add_s:.1f} s; exported to Chroma in {export_s:.1f} s "
        f"({args.n / export_s:,.0f} vectors/s, records() {records_s:.2f} s of it), {size / 1e6:,.0f} MB on disk"
    )
    print(f"ours (exact): {ours_single_qps:,.0f} single queries/s, {ours_batch_qps:,.0f}/s in a batch")
    print(
        f"Chroma (ef_search={chroma['hnsw']['ef_search']}): top-{K} agreement with our exact search "
        f"{chroma['top10_agreement']:.4f}, with where {WHERE} {chroma['top10_agreement_where']:.4f}; "
        f"{chroma['single_qps']:,.0f} single queries/s, {chroma['batch_qps']:,.0f}/s in a batch"
    )
    print(f"wrote {RESULTS / 'export.json'}")


if __name__ == "__main__":
    main()
