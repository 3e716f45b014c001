"""DocumentIndex: exact search equals brute force, add/remove, save/load, faiss recall, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_kadapter.retrieval.index import DocumentIndex, exact_topk

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def random_index(num_docs=100, dim=8, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_docs, dim, generator=generator)
    ids = [f"doc{i}" for i in range(num_docs)]
    return DocumentIndex(ids, embeddings, **kwargs), embeddings


def brute_force(queries, embeddings, k):
    return torch.topk(queries @ embeddings.T, k, dim=1)


@pytest.mark.parametrize(
    "num_docs,chunk_size,query_batch_size,k",
    [
        (100, 1000, 1000, 5),  # one chunk
        (100, 10, 3, 5),  # chunks divide N exactly, several query batches
        (103, 10, 7, 5),  # last chunk shorter than k
        (101, 10, 4, 1),  # last chunk has one row
        (100, 7, 5, 25),  # k larger than a chunk
        (50, 16, 2, 50),  # k = N
    ],
)
def test_exact_search_matches_brute_force(num_docs, chunk_size, query_batch_size, k):
    index, embeddings = random_index(num_docs, chunk_size=chunk_size, query_batch_size=query_batch_size)
    queries = torch.randn(9, 8, generator=torch.Generator().manual_seed(1))
    scores, rows = index.search(queries, k)
    expected_scores, expected_rows = brute_force(queries, embeddings, k)
    assert scores.shape == rows.shape == (9, k)
    assert rows.dtype == torch.int64
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, expected_rows)
    # Rows point at the documents with those scores.
    torch.testing.assert_close((queries.unsqueeze(1) * embeddings[rows]).sum(-1), scores, rtol=1e-5, atol=1e-5)


def test_ties_give_brute_force_scores_and_valid_rows():
    # Integer embeddings: many exactly equal scores, spread across chunk boundaries.
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]] * 7)
    index = DocumentIndex([str(i) for i in range(len(embeddings))], embeddings, chunk_size=4)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for k in (1, 5, 10, 35):
        scores, rows = index.search(queries, k)
        expected_scores, _ = brute_force(queries, embeddings, k)
        assert torch.equal(scores, expected_scores)
        assert torch.equal((queries.unsqueeze(1) * embeddings[rows]).sum(-1), scores)
        for row in rows.tolist():
            assert len(set(row)) == k  # no document returned twice


def test_k_larger_than_index_is_clamped_and_1d_query():
    index, embeddings = random_index(6)
    scores, rows = index.search(embeddings[0], 10)
    assert scores.shape == (1, 6)
    assert rows[0, 0].item() == torch.topk(embeddings @ embeddings[0], 1).indices.item()


def test_exact_topk_function_rejects_bad_k():
    with pytest.raises(ValueError, match="k=7"):
        exact_topk(torch.randn(2, 3), torch.randn(5, 3), 7)


def test_add_remove_get():
    index, embeddings = random_index(20, chunk_size=6)
    extra = torch.randn(5, 8)
    index.add([f"new{i}" for i in range(5)], extra)
    assert len(index) == 25
    assert torch.equal(index.get(["new3", "doc2"]), torch.stack([extra[3], embeddings[2]]))
    index.remove(["doc0", "doc7", "new1", "doc7"])
    assert len(index) == 22
    assert "doc7" not in index and "new0" in index
    expected_ids = [f"doc{i}" for i in range(20) if i not in (0, 7)] + ["new0", "new2", "new3", "new4"]
    assert index.ids == expected_ids
    full = torch.cat([embeddings, extra])
    kept = [i for i in range(25) if i not in (0, 7, 21)]
    assert torch.equal(index.embeddings, full[kept])
    queries = torch.randn(4, 8)
    scores, rows = index.search(queries, 6)
    expected_scores, expected_rows = brute_force(queries, full[kept], 6)
    torch.testing.assert_close(scores, expected_scores)
    assert index.ids_at(rows) == [[expected_ids[r] for r in row] for row in expected_rows.tolist()]
    assert index.rows(["new4"]).tolist() == [21]


def test_empty_index_then_add():
    index = DocumentIndex(dim=4)
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(1, 4), 1)
    index.add(["a", "b"], torch.eye(4)[:2])
    _, rows = index.search(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 1)
    assert index.ids_at(rows) == [["b"]]


def test_clear_errors():
    index, _ = random_index(10)
    with pytest.raises(ValueError, match="duplicate"):
        index.add(["doc1"], torch.randn(1, 8))
    with pytest.raises(ValueError, match="duplicate"):
        DocumentIndex(["a", "a"], torch.randn(2, 3))
    with pytest.raises(ValueError, match="3 ids but 2"):
        DocumentIndex(["a", "b", "c"], torch.randn(2, 3))
    with pytest.raises(ValueError, match="width"):
        index.add(["x"], torch.randn(1, 5))
    with pytest.raises(TypeError, match="strings"):
        index.add([3], torch.randn(1, 8))
    with pytest.raises(KeyError, match="nope"):
        index.get(["nope"])
    with pytest.raises(KeyError, match="nope"):
        index.remove(["doc1", "nope"])
    assert len(index) == 10  # a failed remove changes nothing
    with pytest.raises(ValueError, match=r"queries must be \[num_queries, 8\]"):
        index.search(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="k=0"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="backend"):
        DocumentIndex(["a"], torch.randn(1, 3), backend="annoy")
    with pytest.raises(ValueError, match="faiss_index"):
        DocumentIndex(["a"], torch.randn(1, 3), faiss_index="pq")
    with pytest.raises(FileNotFoundError, match="not a saved DocumentIndex"):
        DocumentIndex.from_pretrained("/nonexistent/folder")


def test_save_load_round_trip(tmp_path):
    index, _ = random_index(30, chunk_size=7, query_batch_size=3)
    index.add(["z"], torch.randn(1, 8))
    index.remove(["doc4"])
    index.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "index_config.json").read_text())["num_docs"] == 30
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))
    loaded = DocumentIndex.from_pretrained(tmp_path)
    assert loaded.ids == index.ids
    assert torch.equal(loaded.embeddings, index.embeddings)
    assert (loaded.chunk_size, loaded.query_batch_size) == (7, 3)
    queries = torch.randn(5, 8)
    for a, b in zip(loaded.search(queries, 4), index.search(queries, 4), strict=True):
        assert torch.equal(a, b)
    loaded.add(["y"], torch.randn(1, 8))  # still usable
    assert loaded.rows(["y"]).item() == 30


def test_documents_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    documents = datasets.Dataset.from_dict(
        {"id": ["b", "a", "c"], "title": ["B", "A", "C"], "text": ["bee", "ay", "see"]}
    )
    index = DocumentIndex(["a", "b", "c"], torch.eye(3), documents=documents)
    assert [d["text"] for d in index.get_documents(["c", "a"])] == ["see", "ay"]
    index.save_pretrained(tmp_path)
    loaded = DocumentIndex.from_pretrained(tmp_path)
    assert loaded.get_documents(["b"])[0]["title"] == "B"


def test_document_lookup_follows_changed_documents():
    """Swapping in documents of the same length, or editing a list in place, never returns another document."""
    from hf_kadapter import RealmStyleRetriever

    datasets = pytest.importorskip("datasets")
    first = datasets.Dataset.from_dict({"id": ["a", "b"], "title": ["A", "B"], "text": ["ay", "bee"]})
    second = datasets.Dataset.from_dict({"id": ["b", "a"], "title": ["B2", "A2"], "text": ["bee2", "ay2"]})
    index = DocumentIndex(["a", "b"], torch.eye(2), documents=first)
    assert index.get_documents(["a"])[0]["text"] == "ay"
    index.documents = second
    assert [d["text"] for d in index.get_documents(["a", "b"])] == ["ay2", "bee2"]

    records = [{"id": "a", "title": "A", "text": "ay"}, {"id": "b", "title": "B", "text": "bee"}]
    retriever = RealmStyleRetriever(embedder=None, tokenizer=None, documents=records)
    assert retriever.get_documents(["b"])[0]["text"] == "bee"
    records[0], records[1] = records[1], {"id": "c", "title": "C", "text": "see"}  # same length, edited in place
    assert retriever.get_documents(["c", "b"]) == [records[1], records[0]]
    with pytest.raises(KeyError, match="'a'"):
        retriever.get_documents(["a"])
    retriever.documents = second
    assert retriever.get_documents(["a"])[0]["title"] == "A2"


# ----- faiss --------------------------------------------------------------------------------------------------


def clustered(num_docs=3000, dim=32, clusters=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator) * 3
    assign = torch.randint(clusters, (num_docs,), generator=generator)
    docs = centers[assign] + torch.randn(num_docs, dim, generator=generator)
    queries = centers[torch.randint(clusters, (50,), generator=generator)] + torch.randn(50, dim, generator=generator)
    return docs, queries


def recall_at(approx_rows, exact_rows):
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx_rows.tolist(), exact_rows.tolist(), strict=True))
    return hits / exact_rows.numel()


@pytest.mark.parametrize(
    "kind,params",
    [
        ("ivf", dict(nlist=32, nprobe=8)),
        ("hnsw", dict(M=16, ef_search=64)),
        ("ivfpq", dict(nlist=32, nprobe=8, rescore_factor=8)),
        ("ivfsq", dict(nlist=32, nprobe=8)),
    ],
)
def test_faiss_recall_add_remove_save_load(tmp_path, kind, params):
    pytest.importorskip("faiss")
    docs, queries = clustered()
    ids = [f"d{i}" for i in range(len(docs))]
    exact = DocumentIndex(ids, docs)
    approx = DocumentIndex(ids, docs, backend="faiss", faiss_index=kind, **params)
    _, exact_rows = exact.search(queries, 10)
    scores, rows = approx.search(queries, 10)
    assert recall_at(rows, exact_rows) >= 0.9
    valid = rows >= 0
    torch.testing.assert_close(scores[valid], (queries.unsqueeze(1) * docs[rows.clamp(min=0)]).sum(-1)[valid])

    # add: a new document equal to a query is its top hit; remove: it is gone again.
    approx.add(["query0"], queries[:1] * 10)
    exact.add(["query0"], queries[:1] * 10)
    assert approx.ids_at(approx.search(queries[:1], 1)[1]) == [["query0"]]
    gone = ids[:200]
    approx.remove(gone + ["query0"])
    exact.remove(gone + ["query0"])
    _, exact_rows = exact.search(queries, 10)
    _, rows = approx.search(queries, 10)
    found = set(i for row in approx.ids_at(rows) for i in row if i is not None)
    assert not found & set(gone + ["query0"])
    assert recall_at(rows, exact_rows) >= 0.9

    approx.save_pretrained(tmp_path)
    assert (tmp_path / "faiss.index").is_file()
    loaded = DocumentIndex.from_pretrained(tmp_path)
    assert loaded._faiss is not None  # read back, not rebuilt
    for a, b in zip(loaded.search(queries, 10), approx.search(queries, 10), strict=True):
        assert torch.equal(a, b)
    loaded.add(["late"], queries[1:2] * 10)
    assert loaded.ids_at(loaded.search(queries[1:2], 1)[1]) == [["late"]]


def test_faiss_holds_the_only_copy_of_flat_vectors_and_compressed_kinds_keep_theirs(tmp_path):
    pytest.importorskip("faiss")
    docs, queries = clustered(num_docs=1000)
    ids = [f"d{i}" for i in range(len(docs))]
    flat = DocumentIndex(ids, docs, backend="faiss", faiss_index="ivf", nlist=8, nprobe=8)
    flat.search(queries, 3)
    assert flat._store is None  # the torch copy is gone: faiss's is the only one
    assert torch.equal(flat.get(["d7", "d3"]), docs[[7, 3]]) and torch.equal(flat.embeddings, docs)
    flat.save_pretrained(tmp_path / "flat")
    loaded = DocumentIndex.from_pretrained(tmp_path / "flat")
    assert loaded._store is None and torch.equal(loaded.get(["d5"]), docs[5:6])  # not read into RAM twice
    pq = DocumentIndex(ids, docs, backend="faiss", faiss_index="ivfpq", nlist=8, nprobe=8, rescore_factor=1)
    scores, rows = pq.search(queries, 5)
    torch.testing.assert_close(scores, (queries.unsqueeze(1) * docs[rows]).sum(-1))  # exact scores after re-scoring
    with pytest.raises(ValueError, match="pq_m=5 must divide the embedding width 32"):
        DocumentIndex(ids, docs, backend="faiss", faiss_index="ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="rescore_factor=0"):
        DocumentIndex(ids, docs, backend="faiss", faiss_index="ivfpq", rescore_factor=0)


def test_memory_mapped_index_reads_from_disk_and_changes_in_ram(tmp_path):
    index, embeddings = random_index(50, chunk_size=16)
    index.save_pretrained(tmp_path / "saved")
    mapped = DocumentIndex.from_pretrained(tmp_path / "saved", mmap=True)
    assert mapped.memory_mapped and not DocumentIndex.from_pretrained(tmp_path / "saved").memory_mapped
    assert torch.equal(mapped.embeddings, embeddings)
    extra = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    mapped.add(["x0", "x1", "x2"], extra)
    mapped.remove(["doc0", "x1", "doc30"])
    expected = torch.cat([embeddings, extra])[[i for i in range(53) if i not in (0, 30, 51)]]
    assert torch.equal(mapped.embeddings, expected) and torch.equal(mapped.get(["x2", "doc1"]), expected[[-1, 0]])
    queries = torch.randn(6, 8, generator=torch.Generator().manual_seed(6))
    scores, rows = mapped.search(queries, 5)  # chunked over the file and the rows added in RAM, removed ones skipped
    top_scores, top_rows = brute_force(queries, expected, 5)
    torch.testing.assert_close(scores, top_scores)
    assert torch.equal(rows, top_rows)
    mapped.save_pretrained(tmp_path / "saved")  # into the folder it maps
    again = DocumentIndex.from_pretrained(tmp_path / "saved", mmap=True)
    assert again.ids == mapped.ids and torch.equal(again.embeddings, expected)


def test_build_on_disk_streams_blocks_and_checks_them(tmp_path):
    pytest.importorskip("faiss")
    docs, queries = clustered(num_docs=2000)
    ids = [f"d{i}" for i in range(len(docs))]
    blocks = ((ids[i : i + 300], docs[i : i + 300]) for i in range(0, len(docs), 300))
    built = DocumentIndex.build_on_disk(tmp_path / "built", blocks, backend="faiss", faiss_index="ivfpq", nlist=16,
                                        nprobe=16, rescore_factor=8, embedder_fingerprint="fp2:test")  # fmt: skip
    assert built.memory_mapped and built.embedder_fingerprint == "fp2:test"
    exact = DocumentIndex(ids, docs)
    assert recall_at(built.search(queries, 10)[1], exact.search(queries, 10)[1]) >= 0.95
    loaded = DocumentIndex.from_pretrained(tmp_path / "built", mmap=True)
    assert loaded.ids == ids and loaded.nlist == 16 and loaded._faiss is not None
    with pytest.raises(ValueError, match=r"duplicate document ids \['a'\]"):
        DocumentIndex.build_on_disk(tmp_path / "dup", [(["a", "b"], docs[:2]), (["a"], docs[2:3])])
    with pytest.raises(ValueError, match=r"documents \['b'\].*NaN"):
        DocumentIndex.build_on_disk(tmp_path / "nan", [(["a", "b"], torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))])
    with pytest.raises(ValueError, match="No documents"):
        DocumentIndex.build_on_disk(tmp_path / "empty", [])
    with pytest.raises(TypeError, match="unknown DocumentIndex settings"):
        DocumentIndex.build_on_disk(tmp_path / "typo", [(["a"], docs[:1])], nprobes=3)
    assert not (tmp_path / "dup" / "embeddings.safetensors").exists()  # a failed build commits nothing


def test_id_table_packs_and_finds_ids():
    from hf_kadapter.retrieval.storage import IdTable, _json_string_blocks

    ids = ["a", "é", "中文", "", "a b", "x" * 300]
    table = IdTable.from_list(ids)
    assert table.tolist() == ids and list(table) == ids and table[-1] == "x" * 300
    assert table.rows(["中文", "nope", ""]).tolist() == [2, -1, 3]
    table.extend(["z"])
    table.select(np.array([True, False, True, True, True, True, True]))
    assert table.tolist() == ["a", "中文", "", "a b", "x" * 300, "z"] and table.rows(["z"]).tolist() == [5]
    assert IdTable.from_list(["q", "r", "q"]).duplicates() == ["q"]
    tricky = ["a", "b\\", 'c"d', '","', '\\","', "中"]
    for block_chars in (1, 1 << 20):  # ids.json is parsed in pieces cut between items only
        stream = io.StringIO()
        IdTable.from_list(tricky).write_json(stream)
        assert json.loads(stream.getvalue()) == tricky
        pieces = list(_json_string_blocks(stream.getvalue(), block_chars))
        assert [i for piece in pieces for i in piece] == tricky


def test_one_copy_in_memory_and_a_corpus_larger_than_the_memory_allowed(tmp_path):
    """In a child process (tests/index_memory_worker.py): IVF-flat holds its vectors once (not a torch copy beside
    faiss's), and under RLIMIT_DATA below the size of the vectors an IVF-PQ index is built on disk and searched with
    re-scoring from the memory-mapped file, while reading the vectors into RAM is refused with the fix."""
    pytest.importorskip("faiss")
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_DATA") or not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux (/proc and RLIMIT_DATA)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    worker = ROOT / "tests" / "index_memory_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["built_copies"] < 1.5 and result["loaded_copies"] < 1.5, result
    assert result["vectors_mb"] > result["budget_mb"] and result["memory_mapped"]
    assert result["recall_at_10"] >= 0.9, result
    assert "does not fit in memory" in result["full_load_refused"] and "mmap=True" in result["full_load_refused"]
