"""Benchmark DocumentIndex search at scale: exact, IVF-flat, IVF-PQ with exact re-scoring and HNSW.

For every size (`--sizes`, default 1M and 10M) and data kind (`--data`, clustered and random), 128-d float32
unit vectors are generated block by block and written to disk with `DocumentIndex.build_on_disk` (the vectors are
never all in RAM: a 10M corpus is 5 GB), then every method is built from the memory-mapped file and searched with
the same queries:

* memory per vector: private memory (RssAnon) the built index adds, divided by the number of vectors (the process
  runs with MALLOC_MMAP_THRESHOLD_ set, so freed blocks go back to the OS and RssAnon tells what is held); the
  memory-mapped vectors are page cache, reported separately for IVF-PQ;
* build time (faiss training + adding; exact: nothing to build);
* queries/s (best of `--repeats`) and recall@10 against the exact top 10; for each approximate method a few search
  settings, so the speed/recall trade-off is visible; the speed-up against exact search comes from exact searches
  timed alternately with each setting's (machine load hits both alike);
* for IVF-PQ with re-scoring, a fresh process loads the saved index memory-mapped and answers the queries: its peak
  private and file-backed memory is what "searchable in N GB" means.

Random isotropic vectors are the worst case for approximate search (no structure to exploit); clustered data (1000
Gaussian clusters) is closer to real embeddings. HNSW is built up to `--hnsw-max-docs` (its build is the slowest).
Prints the machine, threads, versions and the command; writes every figure to `--json`.

    python benchmarks/bench_retrieval.py --sizes 1000000 --json retrieval_1m.json
    python benchmarks/bench_retrieval.py --sizes 10000000 --json retrieval_10m.json    # about an hour on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_kadapter.retrieval.index import DocumentIndex
from hf_kadapter.retrieval.storage import exact_topk, map_safetensors

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Machine, threads, versions and the command: printed and stored with every benchmark's figures."""
    import transformers

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "threads": getattr(args, "threads", torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": faiss_version,
    }
    print("\n".join(f"{key}: {value}" for key, value in info.items()), flush=True)
    return info


def settle() -> None:
    """Collect garbage and give freed heap memory back to the OS, so RssAnon tells what is held."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def status(field: str) -> int:
    """A /proc/self/status field in bytes (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def generate(num_docs: int, dim: int, data: str, block: int = 131072, seed: int = 0):
    """(ids, vectors) blocks of a corpus (or, with another seed, of queries from the same distribution): random unit
    vectors, or 1000 clusters with the same centres for every seed."""
    centres = torch.randn(1000, dim, generator=torch.Generator().manual_seed(0))
    for start in range(0, num_docs, block):
        size = min(block, num_docs - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        if data == "random":
            vectors = torch.randn(size, dim, generator=generator)
        else:
            vectors = centres[torch.randint(1000, (size,), generator=generator)]
            vectors += 0.5 * torch.randn(size, dim, generator=generator)
        yield [str(i) for i in range(start, start + size)], torch.nn.functional.normalize(vectors, dim=1)


def queries_for(num: int, dim: int, data: str) -> torch.Tensor:
    return next(generate(num, dim, data, block=num, seed=7))[1]


def recall_at(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    return hits / exact.numel()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_method(
    base: Path, name: str, settings: dict[str, Any], sweep: list[dict[str, Any]], queries, exact_rows, args, exact=None
) -> dict[str, Any]:
    """Build one method over the memory-mapped base, then search with each setting of `sweep`. With `exact` (the
    exact index), every timed search alternates with an exact search of `--exact-queries` queries, and the speed-up
    is the ratio of the two best rates: machine load hits both alike."""
    settle()
    before = status("RssAnon")
    index = DocumentIndex.from_pretrained(base, mmap=True, **settings)
    start = time.perf_counter()
    if index.backend == "faiss":
        index.rebuild_faiss()
    build = time.perf_counter() - start
    settle()
    held = status("RssAnon") - before
    result = {"method": name, "settings": settings, "build_seconds": round(build, 2),
              "bytes_per_vector": round(held / len(index), 1), "searches": []}  # fmt: skip
    print(f"  {name:<14} build {build:8.1f} s, {held / len(index):7.1f} B/vector private", flush=True)
    for setting in sweep:
        for key, value in setting.items():
            setattr(index, key, value)
        index.search(queries[:8], args.k)  # warm-up
        sample = queries[: args.exact_queries]
        seconds = exact_seconds = float("inf")
        for _ in range(args.repeats):
            if exact is not None:
                exact_seconds = min(exact_seconds, best_time(lambda sample=sample: exact.search(sample, args.k), 1))
            seconds = min(seconds, best_time(lambda index=index: index.search(queries, args.k), 1))
        _, rows = index.search(queries, args.k)
        recall = recall_at(rows, exact_rows)
        line = {**setting, "queries_per_second": round(len(queries) / seconds, 1), f"recall@{args.k}": round(recall, 4)}
        if exact is not None:
            line["exact_queries_per_second_alongside"] = round(len(sample) / exact_seconds, 1)
            line["speedup_vs_exact"] = round(line["queries_per_second"] / line["exact_queries_per_second_alongside"], 2)
        result["searches"].append(line)
        print(f"    {json.dumps(setting):<42} {len(queries) / seconds:10.0f} q/s  recall@{args.k} {recall:.3f}"
              + (f"  speed-up vs exact {line['speedup_vs_exact']:.1f}x" if exact is not None else ""),
              flush=True)  # fmt: skip
    del index
    settle()
    return result


@contextlib.contextmanager
def memory_cgroup(limit_gb: float | None):
    """A memory cgroup capped at `limit_gb` (Linux cgroup v1 or v2, where this process may create one), yielding
    (a function that moves a process into it, a function that reads its peak usage in bytes), or None. The cap
    counts the process's private memory AND the page cache it pulls in, which the kernel then reclaims: a search
    that finishes under it needs no more RAM than that."""
    if limit_gb is None:
        yield None
        return
    own = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in own if ":memory:" in line), None)
    root, files = (Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.max_usage_in_bytes"))
    if v1 is None:
        v1 = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), "/")
        root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.peak")
    group = root / v1.lstrip("/") / f"bench-retrieval-{os.getpid()}"
    try:
        group.mkdir()
        (group / files[0]).write_text(str(int(limit_gb * 2**30)))
    except OSError as error:
        print(f"  (no memory cgroup: {error}; the fresh process runs without a cap)", flush=True)
        yield None
        return
    try:
        yield (lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
               lambda: int((group / files[1]).read_text()))  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def fresh_process_search(folder: Path, queries_path: Path, args, settings: dict[str, Any]) -> dict[str, Any]:
    """Load a saved index memory-mapped in a new process, answer the queries, report its memory (with
    `--serve-memory-limit-gb`, inside a memory cgroup capped at that size)."""
    script = (
        "import json, sys, time, torch\n"
        "from safetensors.torch import load_file\n"
        "from hf_kadapter.retrieval.index import DocumentIndex\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from bench_retrieval import status, recall_at, settle\n"
        "torch.set_num_threads(int(sys.argv[4]))\n"
        "import faiss; faiss.omp_set_num_threads(int(sys.argv[4]))\n"
        "t = load_file(sys.argv[2]); settle(); base = status('RssAnon'); start = time.perf_counter()\n"
        "index = DocumentIndex.from_pretrained(sys.argv[1], mmap=True, **json.loads(sys.argv[5]))\n"
        "loaded = time.perf_counter() - start; start = time.perf_counter()\n"
        "_, rows = index.search(t['queries'], 10)\n"
        "seconds = time.perf_counter() - start\n"
        "print(json.dumps({'load_seconds': round(loaded, 2), 'queries_per_second': round(len(rows) / seconds, 1),\n"
        "  'recall@10': round(recall_at(rows, t['exact_rows']), 4), 'peak_rss_mb': round(status('VmHWM') / 2**20),\n"
        "  'private_mb': round(status('RssAnon') / 2**20), 'index_private_mb': round((status('RssAnon') - base) / 2**20),\n"
        "  'file_backed_mb': round(status('RssFile') / 2**20)}))\n"
    )
    with memory_cgroup(args.serve_memory_limit_gb) as cgroup:
        done = subprocess.run(
            [sys.executable, "-c", script, str(folder), str(queries_path), str(Path(__file__).parent),
             str(args.threads), json.dumps(settings)],
            capture_output=True, text=True, env={**os.environ, **MALLOC_ENV},
            preexec_fn=None if cgroup is None else cgroup[0],
        )  # fmt: skip
        peak = None if cgroup is None else cgroup[1]()
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if peak is not None:
        result["memory_cap_gb"] = args.serve_memory_limit_gb
        result["cgroup_peak_mb"] = round(peak / 2**20)
    return result


def bench_size(num_docs: int, data: str, args, workdir: Path) -> dict[str, Any]:
    print(f"\n== {num_docs:,} documents, {data} ==", flush=True)
    base = workdir / f"{data}-{num_docs}"
    start = time.perf_counter()
    DocumentIndex.build_on_disk(base, generate(num_docs, args.dim, data))
    written = time.perf_counter() - start
    print(f"  vectors written to disk (build_on_disk): {written:.1f} s", flush=True)
    queries = queries_for(args.queries, args.dim, data)
    vectors = map_safetensors(base / "embeddings.safetensors")["embeddings"]
    start = time.perf_counter()
    exact_scores, exact_rows = exact_topk(queries, vectors, args.k, chunk_size=262144, query_batch_size=args.queries)
    exact_all = time.perf_counter() - start
    del vectors
    result: dict[str, Any] = {"num_docs": num_docs, "data": data, "write_seconds": round(written, 2), "methods": []}
    exact = bench_method(base, "exact", {"backend": "exact", "chunk_size": 262144,
                                         "query_batch_size": args.queries}, [{}], queries, exact_rows, args)  # fmt: skip
    exact["searches"][0]["first_pass_seconds"] = round(exact_all, 2)
    result["methods"].append(exact)
    exact_index = DocumentIndex.from_pretrained(base, mmap=True, backend="exact", chunk_size=262144,
                                                query_batch_size=args.queries)  # fmt: skip
    nlist = args.nlist or (1024 if num_docs <= 1_000_000 else 4096)
    ivf = {"backend": "faiss", "nlist": nlist, "train_size": min(num_docs, 64 * nlist)}
    pq = {**ivf, "faiss_index": "ivfpq", "pq_m": args.pq_m, "train_size": min(num_docs, max(64 * nlist, 65536))}
    methods = []
    if "ivf" in args.methods:
        methods.append(("IVF-flat", {**ivf, "faiss_index": "ivf"}, [{"nprobe": p} for p in args.nprobe]))
    if "ivfpq" in args.methods:
        sweep = [{"nprobe": p, "rescore_factor": r} for p in args.nprobe for r in args.rescore]
        methods.append(("IVF-PQ+rescore", pq, sweep))
    if "hnsw" in args.methods and num_docs <= args.hnsw_max_docs:
        hnsw = {"backend": "faiss", "faiss_index": "hnsw", "M": args.hnsw_m, "ef_construction": args.ef_construction}
        methods.append(("HNSW", hnsw, [{"ef_search": e} for e in args.ef_search]))
    for name, settings, sweep in methods:
        result["methods"].append(bench_method(base, name, settings, sweep, queries, exact_rows, args, exact_index))
    del exact_index
    if "ivfpq" not in args.methods:
        shutil.rmtree(base, ignore_errors=True)
        return result
    # IVF-PQ as a user would serve it: saved, then loaded memory-mapped by a fresh process.
    from safetensors.torch import save_file

    searched = next(m for m in result["methods"] if m["method"] == "IVF-PQ+rescore")["searches"]
    best = max(searched, key=lambda s: (s[f"recall@{args.k}"] >= 0.9, s["queries_per_second"]))
    served = workdir / f"{data}-{num_docs}-ivfpq"
    index = DocumentIndex.from_pretrained(base, mmap=True, **pq)
    index.nprobe, index.rescore_factor = best["nprobe"], best["rescore_factor"]
    index.save_pretrained(served)
    del index
    queries_path = workdir / "queries.safetensors"
    save_file({"queries": queries.contiguous(), "exact_rows": exact_rows.contiguous()}, str(queries_path))
    result["ivfpq_fresh_process"] = {"nprobe": best["nprobe"], "rescore_factor": best["rescore_factor"],
                                     **fresh_process_search(served, queries_path, args, {})}  # fmt: skip
    print(f"  IVF-PQ served by a fresh process: {json.dumps(result['ivfpq_fresh_process'])}", flush=True)
    shutil.rmtree(served, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--data", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="search repeats (the best is kept)")
    parser.add_argument("--exact-queries", type=int, default=100, help="queries of the exact searches timed alongside")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default 1024 up to 1M, 4096 above)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--pq-m", type=int, default=32, help="IVF-PQ codes per vector (one byte each)")
    parser.add_argument("--rescore", type=int, nargs="+", default=[16], help="IVF-PQ re-scoring factors")
    parser.add_argument("--methods", nargs="+", default=["ivf", "ivfpq", "hnsw"], choices=["ivf", "ivfpq", "hnsw"],
                        help="approximate methods measured (exact search always is)")  # fmt: skip
    parser.add_argument("--serve-memory-limit-gb", type=float, default=None,
                        help="run the fresh IVF-PQ process in a memory cgroup capped at this size (Linux, if allowed)")  # fmt: skip
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--hnsw-max-docs", type=int, default=1_000_000, help="skip HNSW above this (slow build)")
    parser.add_argument("--workdir", default=None, help="where the vectors are written (default: a temporary folder)")
    parser.add_argument("--json", default="bench_retrieval.json", help="where the figures are written")
    args = parser.parse_args()
    if any(os.environ.get(key) != value for key, value in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})  # see the docstring
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    report = {"environment": environment(args), "results": []}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_retrieval-"))
    for num_docs in args.sizes:
        for data in args.data:
            report["results"].append(bench_size(num_docs, data, args, workdir))
            Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
