"""vidq/ann.py's HNSW parameters on the library benchmark's vectors (benchmarks/libgen.py:
Zipf clusters over 400 labels, 2048 float16 values), without a database: for each graph
(connectivity / expansion on add) its build time, then for each search expansion and
number of candidates re-ranked exactly, recall@10 against numpy's exact answer, the
worst query's recall and the p95 of a search plus its re-rank. The baseline is the
graph and search vidq uses (``ann.CONNECTIVITY``, ``EXPANSION_ADD``,
``EXPANSION_SEARCH``, ``candidate_count(10)``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks.common import Report
from benchmarks.libgen import Library, centroids, video_vectors


def ann_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", type=int, default=48_500,
                        help="vectors in the graph (default 48,500: the 5M library's)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--graphs", default="16/64,16/128,32/64",
                        help="connectivity/expansion-on-add pairs, comma-separated")
    parser.add_argument("--expansions", default="256,512,1024",
                        help="search expansions, comma-separated")
    parser.add_argument("--candidates", default="100,200,400",
                        help="candidates re-ranked exactly, comma-separated")
    parser.add_argument("--quick", action="store_true", help="10,000 vectors, 50 queries")


def _library_vectors(n: int, dim: int) -> tuple[Any, Any]:
    import numpy as np

    lib = Library(videos=n, clips=1, video_vectors=True, dim=dim)
    rng = np.random.default_rng(0)
    labels = rng.choice(lib.labels, size=n, p=lib.label_shares())
    cent = centroids(lib)
    vectors = np.concatenate([video_vectors(rng, cent, labels[i:i + 5000])
                              for i in range(0, n, 5000)])
    unit = vectors.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return vectors, unit


def ann(args: argparse.Namespace) -> list[Report]:
    """recall@10 and latency of vidq/ann.py's graph against other build and search
    parameters, on the library's vectors."""
    import numpy as np
    from usearch.index import Index

    from vidq import ann as vidq_ann

    if args.quick:
        args.vectors, args.queries = 10_000, 50
    vectors, unit = _library_vectors(args.vectors, args.dim)
    rng = np.random.default_rng(1)
    picks = rng.choice(args.vectors, size=args.queries, replace=False)
    truth = {}
    for i in picks:
        scores = unit @ unit[i]
        scores[i] = -9.0
        truth[int(i)] = set(np.argpartition(-scores, 10)[:10].tolist())
    keys = np.arange(args.vectors, dtype=np.uint64)
    ours = (f"{vidq_ann.CONNECTIVITY}/{vidq_ann.EXPANSION_ADD}", vidq_ann.EXPANSION_SEARCH,
            vidq_ann.candidate_count(10))
    recall = Report(f"recall@10 on {args.vectors:,} library vectors ({args.dim}-d float16), "
                    f"{args.queries} queries, against vidq's graph {ours[0]}, search "
                    f"expansion {ours[1]}, {ours[2]} candidates", "recall@10")
    latency = Report("search + exact re-rank p95, same graphs", "ms")
    rows: list[tuple[str, float, float]] = []
    for pair in args.graphs.split(","):
        connectivity, expansion_add = map(int, pair.split("/"))
        graph = Index(ndim=args.dim, metric="cos", dtype="f16", connectivity=connectivity,
                      expansion_add=expansion_add)
        t = time.perf_counter()
        for s in range(0, args.vectors, 5000):
            graph.add(keys[s:s + 5000], vectors[s:s + 5000], threads=os.cpu_count() or 1)
        recall.notes.append(f"graph {pair}: built in {time.perf_counter() - t:.1f}s")
        for expansion in map(int, args.expansions.split(",")):
            graph.expansion_search = expansion
            for count in map(int, args.candidates.split(",")):
                got, times = [], []
                for i in truth:
                    t = time.perf_counter()
                    found = graph.search(vectors[i], count + 1).keys
                    found = found[found != i].astype(np.int64)
                    best = found[np.argsort(-(unit[found] @ unit[i]))[:10]]
                    times.append((time.perf_counter() - t) * 1000)
                    got.append(len(set(best.tolist()) & truth[i]) / 10)
                name = f"graph {pair}, search {expansion}, {count} candidates"
                rows.append((name, float(np.mean(got)), float(np.percentile(times, 95))))
                recall.notes.append(f"{name}: worst query {min(got):.1f}")
    base = next((r for r in rows if r[0] == f"graph {ours[0]}, search {ours[1]}, "
                 f"{ours[2]} candidates"), rows[0])
    recall.add(base[0], base[1], baseline=True)
    latency.add(base[0], base[2], baseline=True)
    for name, value, p95 in rows:
        if name != base[0]:
            recall.add(name, value, against=base[0])
            latency.add(name, p95, against=base[0])
    return [recall, latency]
