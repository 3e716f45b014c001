"""Run by tests/test_retrieval_index.py in a child process: the index's memory behaviour, measured from outside.

1. One copy: a faiss IVF-flat index built from vectors in RAM ends holding one copy of them (RssAnon), built or
   loaded. (Run with MALLOC_MMAP_THRESHOLD_ set, so that glibc returns freed blocks and RssAnon tells what is held.)
2. Past RAM: with RLIMIT_DATA set to less than the corpus' vectors (memory maps of files do not count, private
   memory does), an IVF-PQ index is built on disk from streamed blocks and searched with exact re-scoring from the
   memory-mapped vectors; loading the same vectors into RAM fails under that limit.

Prints one JSON line with what it measured.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

import faiss
import torch

from hf_kadapter.retrieval.index import DocumentIndex
from hf_kadapter.retrieval.storage import exact_topk, map_safetensors

DIM = 32
CENTRES = torch.randn(512, DIM, generator=torch.Generator().manual_seed(0))


def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def block(start: int, size: int) -> torch.Tensor:
    """Rows start..start+size of a clustered corpus, the same whatever the block size."""
    generator = torch.Generator().manual_seed(start)
    rows = CENTRES[torch.randint(len(CENTRES), (size,), generator=generator)]
    return torch.nn.functional.normalize(rows + 0.35 * torch.randn(size, DIM, generator=generator), dim=1)


def one_copy(folder: Path, rows: int, dim: int) -> dict[str, float]:
    """Private memory an IVF-flat index holds, in copies of its vectors (fewer than 65536 rows: faiss adds them in
    one call, so its inverted lists are allocated at their exact size)."""
    size = rows * dim * 4
    gc.collect()
    before = status("RssAnon")
    vectors = torch.randn(rows, dim, generator=torch.Generator().manual_seed(1))
    index = DocumentIndex([str(i) for i in range(rows)], vectors, backend="faiss", faiss_index="ivf", nlist=16)
    del vectors
    index.rebuild_faiss()
    gc.collect()
    built = (status("RssAnon") - before) / size
    index.save_pretrained(folder)
    del index
    gc.collect()
    before = status("RssAnon")
    loaded = DocumentIndex.from_pretrained(folder)
    loaded.search(torch.randn(4, dim), 3)
    gc.collect()
    return {"built_copies": built, "loaded_copies": (status("RssAnon") - before) / size}


def past_ram(folder: Path, rows: int, budget: int) -> dict[str, float]:
    size = rows * DIM * 4
    limit = status("VmData") + budget
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    step = 32768
    blocks = (([str(i) for i in range(s, min(s + step, rows))], block(s, min(step, rows - s)))
              for s in range(0, rows, step))  # fmt: skip
    index = DocumentIndex.build_on_disk(folder, blocks, backend="faiss", faiss_index="ivfpq", nlist=256, nprobe=32,
                                        pq_m=16, pq_bits=6, rescore_factor=64, query_batch_size=64, train_size=5_000)  # fmt: skip
    queries = block(10**9, 64)
    scores, rows_found = index.search(queries, 10)
    mapped = index.memory_mapped
    del index
    # The exact answer, straight from the memory-mapped file (exact_topk reads it chunk by chunk).
    vectors = map_safetensors(folder / "embeddings.safetensors")["embeddings"]
    exact_scores, exact_rows = exact_topk(queries, vectors, 10, chunk_size=16384, query_batch_size=64)
    del vectors
    hits = sum(len(set(a) & set(b)) for a, b in zip(rows_found.tolist(), exact_rows.tolist(), strict=True))
    try:
        DocumentIndex.from_pretrained(folder)  # the vectors read into RAM: more than the limit allows
        refused = ""
    except MemoryError as error:
        refused = str(error)
    return {
        "vectors_mb": size / 2**20,
        "budget_mb": budget / 2**20,
        "recall_at_10": hits / exact_rows.numel(),
        "max_score_error": float((scores - exact_scores).abs().max()),
        "full_load_refused": refused,
        "memory_mapped": mapped,
    }


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    result = one_copy(folder / "flat", rows=60_000, dim=128)  # 29 MB of vectors
    result.update(past_ram(folder / "pq", rows=800_000, budget=64 * 2**20))  # 98 MiB of vectors, 64 MiB allowed
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
