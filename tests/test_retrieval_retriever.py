"""RealmStyleRetriever: retrieval with exclusion, the null document, rescoring against a stale index, build_index."""

from __future__ import annotations

import os
import string
import threading

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertModel, BertTokenizer

from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder
from hf_kadapter.retrieval.retriever import NULL_DOC_ID, RealmStyleRetriever

torch.set_num_threads(1)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_TOKENS = (
    SPECIALS
    + list(string.ascii_lowercase)
    + [f"##{c}" for c in string.ascii_lowercase]
    + list(string.digits)
    + list(".,")
)


def tiny_tokenizer(tmp_path) -> BertTokenizer:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB_TOKENS) + "\n")
    return BertTokenizer(vocab=str(vocab))


def make_embedder(seed: int = 0, dim: int = 8) -> RetrieverEmbedder:
    """Engineer 1's RetrieverEmbedder around a tiny random BERT (separate query/document towers, no dropout)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB_TOKENS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RetrieverEmbedder.from_encoder(BertModel(config, add_pooling_layer=False), shared=False, projection_dim=dim)


DOCS = [
    ("d0", "paris", "paris is the capital of france."),
    ("d1", "berlin", "berlin is the capital of germany."),
    ("d2", "rome", "rome is the capital of italy."),
    ("d3", "madrid", "madrid is the capital of spain."),
    ("d4", "lisbon", "lisbon is the capital of portugal."),
    ("d5", "vienna", "vienna is the capital of austria."),
    ("d6", "oslo", "oslo is the capital of norway."),
]


@pytest.fixture
def corpus() -> Dataset:
    return Dataset.from_dict({k: [d[i] for d in DOCS] for i, k in enumerate(("id", "title", "text"))})


@pytest.fixture
def retriever(tmp_path, corpus) -> RealmStyleRetriever:
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    retriever.build_index(corpus, batch_size=3, max_length=32, progress=False)
    return retriever


def brute_force(retriever, queries, k):
    with torch.no_grad():
        q = retriever.embedder.embed_queries(**dict(retriever.tokenizer(queries, padding=True, return_tensors="pt")))
    scores = q @ retriever.index.embeddings.T
    top = torch.topk(scores, k)
    return top.values, [[retriever.index.ids[i] for i in row] for row in top.indices.tolist()]


def test_retrieve_matches_brute_force(retriever):
    queries = ["capital of france", "where is oslo"]
    out = retriever.retrieve(queries, k=3, max_length=32, doc_max_length=32)
    values, ids = brute_force(retriever, queries, 3)
    assert out.doc_ids == ids
    assert out.scores.shape == (2, 3) and out.mask.all()
    # The index is fresh here, so rescored scores equal the index scores.
    torch.testing.assert_close(out.scores.detach(), values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.index_scores, values, rtol=1e-4, atol=1e-4)
    assert out.doc_input_ids.shape[:2] == (2, 3)
    assert out.texts[0][0] == dict((d[0], d[2]) for d in DOCS)[ids[0][0]]
    assert out.titles[1][0] == dict((d[0], d[1]) for d in DOCS)[ids[1][0]]


def test_exclude_ids(retriever):
    queries = ["capital of france", "where is oslo"]
    _, ids = brute_force(retriever, queries, 4)
    out = retriever.retrieve(queries, k=3, exclude_ids=[[ids[0][0]], ids[1][1]], max_length=32)
    assert out.doc_ids[0] == ids[0][1:4]
    assert out.doc_ids[1] == [ids[1][0]] + ids[1][2:4]
    # Excluding more than the corpus can fill: padding, masked with -inf scores.
    everything = [d[0] for d in DOCS[:6]]
    out = retriever.retrieve(["x"], k=3, exclude_ids=[everything], max_length=32)
    assert out.doc_ids[0][1:] == [None, None] and out.mask.tolist() == [[True, False, False]]
    assert torch.isinf(out.scores[0, 1:]).all()
    with pytest.raises(ValueError, match="exclude_ids"):
        retriever.retrieve(["a", "b"], k=2, exclude_ids=[["d0"]])


def test_null_document(retriever):
    out = retriever.retrieve(["capital of france"], k=2, add_null=True, max_length=32)
    assert out.scores.shape == (1, 3) and out.doc_ids[0][-1] == NULL_DOC_ID
    assert out.texts[0][-1] == "" and out.titles[0][-1] == ""
    # The null document is the empty (title, text) pair, "[CLS] [SEP] [SEP]": scored like any other document.
    tok = retriever.tokenizer
    expected = tok([""], [""], return_tensors="pt")
    assert expected["input_ids"][0].tolist() == [tok.cls_token_id, tok.sep_token_id, tok.sep_token_id]
    null_ids = out.doc_input_ids[0, -1][out.doc_attention_mask[0, -1].bool()]
    assert null_ids.tolist() == expected["input_ids"][0].tolist()
    with torch.no_grad():
        q = retriever.embedder.embed_queries(**dict(tok(["capital of france"], return_tensors="pt")))
        d = retriever.embedder.embed_documents(**dict(expected))
    torch.testing.assert_close(out.scores[0, -1].detach(), (q @ d.T)[0, 0], rtol=1e-4, atol=1e-4)


def test_rescoring_against_stale_index_gives_fresh_scores_and_gradients(retriever):
    stale = retriever.index.embeddings.clone()
    # Training moves the document encoder: the index is now stale.
    with torch.no_grad():
        for p in retriever.embedder.document_tower.projection.parameters():
            p.add_(torch.randn_like(p))
    out = retriever.retrieve(["capital of france"], k=3, rescore=True, max_length=32)
    assert torch.equal(retriever.index.embeddings, stale)
    # Candidates come from the stale index ...
    with torch.no_grad():
        q = retriever.embedder.embed_queries(**dict(retriever.tokenizer(["capital of france"], return_tensors="pt")))
    stale_ids = [retriever.index.ids[i] for i in torch.topk(q @ stale.T, 3).indices[0].tolist()]
    assert out.doc_ids[0] == stale_ids
    # ... but the scores are the current embedder's and differ from the index's.
    fresh_docs = [next(d for d in DOCS if d[0] == doc_id) for doc_id in stale_ids]
    enc = retriever.tokenize_documents([d[1] for d in fresh_docs], [d[2] for d in fresh_docs], 32)
    with torch.no_grad():
        fresh = q @ retriever.embedder.embed_documents(**dict(enc)).T
    torch.testing.assert_close(out.scores.detach(), fresh, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(out.scores.detach(), out.index_scores)
    out.scores.sum().backward()
    assert retriever.embedder.document_tower.projection.weight.grad.abs().sum() > 0
    assert retriever.embedder.query_tower.projection.weight.grad.abs().sum() > 0

    # Without rescoring: index embeddings, gradients to the query side only.
    retriever.embedder.zero_grad(set_to_none=True)
    out = retriever.retrieve(["capital of france"], k=3, rescore=False, max_length=32)
    torch.testing.assert_close(out.scores.detach(), out.index_scores, rtol=1e-4, atol=1e-4)
    out.scores.sum().backward()
    assert retriever.embedder.query_tower.projection.weight.grad.abs().sum() > 0
    assert retriever.embedder.document_tower.projection.weight.grad is None


def test_tokenized_queries(retriever):
    tokens = retriever.tokenizer(["capital of france"], padding=True, return_tensors="pt")
    by_text = retriever.retrieve(["capital of france"], k=2, max_length=32)
    by_ids = retriever.retrieve(dict(tokens), k=2, max_length=32)
    assert by_text.doc_ids == by_ids.doc_ids


def test_build_index_resumable(tmp_path, corpus, monkeypatch):
    tok = tiny_tokenizer(tmp_path)
    retriever = RealmStyleRetriever(make_embedder(), tok)
    reference = retriever.build_index(corpus, batch_size=3, max_length=32, progress=False, set_index=False)
    output = tmp_path / "build"

    calls = {"n": 0}
    original = retriever.embedder.embed_documents

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(retriever.embedder, "embed_documents", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=output, progress=True)
    assert len(list(output.glob("chunk-*.safetensors"))) == 1
    calls["n"] = 10
    index = retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=output, progress=True)
    assert calls["n"] == 12  # only the two missing batches were embedded
    torch.testing.assert_close(index.embeddings, reference.embeddings)
    assert index.ids == [d[0] for d in DOCS] and retriever.index is index
    assert (output / "index").is_dir()
    with pytest.raises(ValueError, match="different settings"):
        retriever.build_index(corpus, batch_size=2, max_length=32, output_dir=output, progress=False)
    # A newer embedder snapshot must not reuse the old chunks.
    with torch.no_grad():
        next(retriever.embedder.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="different settings"):
        retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=output, progress=False)


def test_index_building_records_no_autograd_graph(tmp_path, corpus, monkeypatch):
    """build_index, embed_corpus and add_documents embed without building a graph (memory and time of a forward)."""
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    original, grad_modes = retriever.embedder.embed_documents, []

    def spy(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(retriever.embedder, "embed_documents", spy)
    retriever.build_index(corpus.select(range(4)), batch_size=2, max_length=32, progress=False)
    retriever.build_index(corpus, batch_size=2, max_length=32, progress=False, output_dir=tmp_path / "b")
    retriever.embed_corpus(corpus, batch_size=4, max_length=32, progress=False)
    retriever.add_documents([{"id": "new", "title": "New", "text": "a new document"}], max_length=32, progress=False)
    assert grad_modes and not any(grad_modes)


def test_embed_corpus_folder_reused_only_by_the_same_build(tmp_path, corpus):
    """embed_corpus(output_dir=) called directly keeps a build state too: its chunks resume the same corpus and
    embedder, and an edited corpus or another embedder snapshot is refused instead of mixed with them."""
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    output = tmp_path / "chunks"
    first = retriever.embed_corpus(corpus, batch_size=3, max_length=32, progress=False, output_dir=output)
    chunks = sorted(output.glob("chunk-*.safetensors"))
    assert (output / "build_state.json").is_file() and len(chunks) == -(-len(corpus) // 3)
    again = retriever.embed_corpus(corpus, batch_size=3, max_length=32, progress=False, output_dir=output)
    torch.testing.assert_close(again, first)
    # build_index with the same settings resumes from these chunks.
    index = retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=output, progress=False)
    torch.testing.assert_close(index.embeddings, first)
    edited = corpus.map(lambda row: {"text": row["text"] + " (edited)"})
    with pytest.raises(ValueError, match="different settings"):
        retriever.embed_corpus(edited, batch_size=3, max_length=32, progress=False, output_dir=output)
    with torch.no_grad():
        next(retriever.embedder.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="different settings"):
        retriever.embed_corpus(corpus, batch_size=3, max_length=32, progress=False, output_dir=output)


def test_no_index_error(tmp_path):
    with pytest.raises(ValueError, match="build_index"):
        RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path)).retrieve(["a"], k=1)


def test_save_and_load_round_trip(tmp_path, retriever):
    retriever.save_pretrained(tmp_path / "saved")
    loaded = RealmStyleRetriever.from_pretrained(tmp_path / "saved", embedder_class=RetrieverEmbedder)
    assert loaded.index.ids == retriever.index.ids
    torch.testing.assert_close(loaded.index.embeddings, retriever.index.embeddings)
    assert list(loaded.documents["id"]) == [d[0] for d in DOCS]
    query = ["capital of france", "where is oslo"]
    a = retriever.retrieve(query, k=3, add_null=True, max_length=32)
    b = loaded.retrieve(query, k=3, add_null=True, max_length=32)
    assert a.doc_ids == b.doc_ids and a.texts == b.texts
    torch.testing.assert_close(a.scores, b.scores)


def test_add_and_remove_documents(retriever):
    new = Dataset.from_dict({"id": ["d7"], "title": ["athens"], "text": ["athens is the capital of greece."]})
    retriever.add_documents(new, max_length=32)
    assert retriever.index.ids[-1] == "d7" and len(retriever.documents) == len(DOCS) + 1
    with torch.no_grad():
        expected = retriever.embedder.embed_documents(
            **dict(retriever.tokenize_documents(["athens"], [new[0]["text"]], 32))
        )
    torch.testing.assert_close(retriever.index.get(["d7"]), expected, rtol=1e-4, atol=1e-4)
    out = retriever.retrieve(["athens"], k=len(DOCS) + 1, max_length=32)
    assert "d7" in out.doc_ids[0] and out.texts[0][out.doc_ids[0].index("d7")] == new[0]["text"]
    retriever.remove_documents(["d7", "d0"])
    out = retriever.retrieve(["athens"], k=len(DOCS) + 1, max_length=32)
    assert "d7" not in out.doc_ids[0] and "d0" not in out.doc_ids[0]
    assert out.mask.sum() == len(DOCS) - 1


def test_push_to_hub(retriever, fake_hub):
    retriever.push_to_hub("me/realm-retriever")
    (commit,) = fake_hub.commits
    assert commit["repo_id"] == "me/realm-retriever"
    assert {f.split("/")[0] for f in commit["files"]} == {
        "README.md",
        "documents",
        "embedder",
        "index",
        "retriever_config.json",
    }


def _distributed_build(rank: int, world: int, port: int, folder: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        corpus = Dataset.from_dict({k: [d[i] for d in DOCS] for i, k in enumerate(("id", "title", "text"))})
        retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(Path(folder) / f"tok{rank}"))
        for mode, output_dir in (("gather", None), ("folder", str(Path(folder) / "build"))):
            index = retriever.build_index(corpus, batch_size=2, max_length=32, output_dir=output_dir, progress=False)
            torch.save({"ids": index.ids, "embeddings": index.embeddings}, Path(folder) / f"{mode}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_build_index_splits_rows_across_processes(tmp_path, corpus):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for rank in range(2):
        (tmp_path / f"tok{rank}").mkdir()
    mp.spawn(_distributed_build, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path)).build_index(
        corpus, batch_size=2, max_length=32, progress=False
    )
    for name in ("gather0", "gather1", "folder0", "folder1"):
        result = torch.load(tmp_path / f"{name}.pt")
        assert result["ids"] == single.ids, name
        torch.testing.assert_close(result["embeddings"], single.embeddings, rtol=1e-5, atol=1e-5)
    # 4 batches of 2 rows, split round-robin over the 2 ranks, all written to the shared folder.
    assert len(list((tmp_path / "build").glob("chunk-*.safetensors"))) == 4


def test_build_index_rank_split_simulated_with_threads(tmp_path, corpus, monkeypatch):
    """Fast stand-in for the gloo test: two threads play ranks 0 and 1 (torch.distributed calls patched)."""
    import hf_kadapter.retrieval.retriever as retriever_module

    local, barrier, shared = threading.local(), threading.Barrier(2, timeout=60), {}
    embedded_rows: dict[int, list[str]] = {0: [], 1: []}
    refused: dict[int, str] = {}

    def all_reduce(tensor, op=None):
        shared[local.rank] = tensor.clone()
        barrier.wait()
        combine = torch.maximum if op == torch.distributed.ReduceOp.MAX else torch.add
        tensor.copy_(combine(shared[0], shared[1]))
        barrier.wait()

    monkeypatch.setattr(retriever_module, "_distributed", lambda: (local.rank, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barrier.wait())
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    results, errors = {}, []

    def run(rank):
        local.rank = rank
        try:
            retriever = retrievers[rank]
            original = retriever._embed_rows

            def spy(dataset, batch_size, max_length, progress, embedder, folder, rows, dtype):
                embedded_rows[rank].extend(rows)
                return original(dataset, batch_size, max_length, progress, embedder, folder, rows, dtype)

            retriever._embed_rows = spy
            for mode, output_dir in (("gather", None), ("folder", tmp_path / "build")):
                index = retriever.build_index(
                    corpus, batch_size=2, max_length=32, output_dir=output_dir, progress=False
                )
                results[mode, rank] = (index.ids, index.embeddings)
            # Other settings in the same folder: every rank is refused (none left waiting at a barrier).
            try:
                retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=tmp_path / "build")
            except ValueError as error:
                refused[rank] = str(error)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
            barrier.abort()

    for rank in range(2):
        (tmp_path / f"tok{rank}").mkdir()
    # Built here: make_embedder seeds the global RNG, which two threads would share.
    retrievers = [RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path / f"tok{rank}")) for rank in range(2)]
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(refused) == [0, 1] and all("different settings" in message for message in refused.values())
    # Batches of 2 rows go round-robin: rank 0 embeds rows 0, 1, 4, 5; rank 1 rows 2, 3, 6 (twice: two modes).
    assert embedded_rows[0] == [0, 1, 4, 5] * 2 and embedded_rows[1] == [2, 3, 6] * 2
    monkeypatch.undo()
    single = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path)).build_index(
        corpus, batch_size=2, max_length=32, progress=False
    )
    for key, (ids, embeddings) in results.items():
        assert ids == single.ids, key
        torch.testing.assert_close(embeddings, single.embeddings, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "build").glob("chunk-*.safetensors"))) == 4
