"""Benchmark DocumentIndex search.

1. Exact backend vs a bare `torch.topk(q @ E.T)` over the same embeddings (goal: time ratio close to 1), for the
   default single-chunk path and for the chunked path (chunk_size smaller than the corpus). The two are timed
   alternately and the median per-round ratio is reported, so machine load affects both alike.
2. faiss IVF / HNSW vs exact search: build time, query throughput, speed-up and recall@10.

Random 128-d float32 embeddings (unit-normalised Gaussian), random queries. Defaults keep the run under
~4 minutes on 2 CPU cores; everything used is printed. Random isotropic data has no cluster structure, the worst
case for approximate search: recall there is a lower bound of what real embeddings give; `--data clustered`
(1000 Gaussian clusters) is closer to real retriever embeddings.

    python benchmarks/bench_retrieval.py                  # 100k and 1M documents
    python benchmarks/bench_retrieval.py --sizes 100000 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_kadapter.retrieval.index import DocumentIndex


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paired(fn, reference, repeat: int = 5) -> tuple[float, float]:
    """Best time of `fn` and the median of per-round time ratios fn / reference, the two run alternately
    (a shared machine's load then affects both alike)."""
    fn()
    reference()
    times, ratios = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        fn()
        end = time.perf_counter()
        times.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return min(times), statistics.median(ratios)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    return hits / exact.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--hnsw-max-docs", type=int, default=100_000, help="skip HNSW above this (slow build)")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument(
        "--data",
        choices=["random", "clustered"],
        default="random",
        help="random: isotropic Gaussian; clustered: 1000 Gaussian clusters, queries near cluster centres",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        faiss_version = faiss.__version__
    except ImportError:
        faiss = None
        faiss_version = "not installed"
    print(
        f"torch {torch.__version__}, faiss {faiss_version}, threads {args.threads}, dim {args.dim}, "
        f"queries {args.queries}, k {args.k}, data {args.data}"
    )

    generator = torch.Generator().manual_seed(0)
    for num_docs in args.sizes:
        bench_size(num_docs, args, faiss, generator)


def bench_size(num_docs: int, args: argparse.Namespace, faiss, generator: torch.Generator) -> None:
    if args.data == "random":
        embeddings = torch.randn(num_docs, args.dim, generator=generator)
        queries = torch.randn(args.queries, args.dim, generator=generator)
    else:
        centres = torch.randn(1000, args.dim, generator=generator)
        embeddings = centres[torch.randint(1000, (num_docs,), generator=generator)]
        embeddings += 0.5 * torch.randn(num_docs, args.dim, generator=generator)
        queries = centres[torch.randint(1000, (args.queries,), generator=generator)]
        queries += 0.5 * torch.randn(args.queries, args.dim, generator=generator)
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    queries = torch.nn.functional.normalize(queries, dim=1)
    ids = [str(i) for i in range(num_docs)]
    print(f"\n== {num_docs:,} documents ==")

    def bare_search():
        return torch.topk(queries @ embeddings.T, args.k, dim=1)

    bare = timed(bare_search)
    print(f"bare torch.topk(q @ E.T)        {args.queries / bare:10.0f} q/s")
    exact = DocumentIndex(ids, embeddings, chunk_size=max(num_docs, 65536), query_batch_size=args.queries)
    t, ratio = paired(lambda: exact.search(queries, args.k), bare_search)
    print(f"DocumentIndex exact (1 chunk)   {args.queries / t:10.0f} q/s  time ratio to bare {ratio:.2f}")
    chunked = DocumentIndex(ids, embeddings, chunk_size=65536, query_batch_size=256)
    t, ratio = paired(lambda: chunked.search(queries, args.k), bare_search)
    print(
        f"DocumentIndex exact (chunks 65536, query batch 256) {args.queries / t:10.0f} q/s  "
        f"time ratio to bare {ratio:.2f}"
    )
    exact_time = timed(lambda: exact.search(queries, args.k), repeat=1)
    _, exact_rows = exact.search(queries, args.k)

    if faiss is None or args.no_faiss:
        return
    kinds = [("ivf", {"nlist": args.nlist or int(num_docs**0.5), "nprobe": args.nprobe})]
    if num_docs <= args.hnsw_max_docs:
        kinds.append(("hnsw", {"M": 16, "ef_search": 64, "ef_construction": 40}))
    for kind, params in kinds:
        index = DocumentIndex(ids, embeddings, backend="faiss", faiss_index=kind, **params)
        start = time.perf_counter()
        index.rebuild_faiss()
        build = time.perf_counter() - start
        detail = f"nlist {index.nlist or index.default_nlist()}, nprobe {index.nprobe}" if kind == "ivf" else ""
        if kind == "hnsw":
            detail = f"M {index.M}, efConstruction {index.ef_construction}, efSearch {index.ef_search}"
        t = timed(lambda index=index, queries=queries: index.search(queries, args.k), repeat=1)
        _, rows = index.search(queries, args.k)
        print(
            f"faiss {kind.upper():4s} ({detail}): build {build:6.1f} s, {args.queries / t:10.0f} q/s, "
            f"speed-up {exact_time / t:5.1f}x vs exact, recall@{args.k} {recall_at_k(rows, exact_rows):.3f}"
        )
        del index


if __name__ == "__main__":
    main()
