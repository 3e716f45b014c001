"""DocumentIndex: exact search equals brute force, add/remove, save/load, faiss recall, errors."""

from __future__ import annotations

import json

import pytest
import torch

from hf_kadapter.retrieval.index import DocumentIndex, exact_topk

torch.set_num_threads(1)


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


@pytest.mark.parametrize("kind,params", [("ivf", dict(nlist=32, nprobe=8)), ("hnsw", dict(M=16, ef_search=64))])
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
