"""Index building in half precision (build_index / embed_corpus dtype=): within the tolerance docs/performance.md
states, recorded in the build state so a resumed build never mixes precisions, the embedder's weights untouched."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_retrieval_retriever import DOCS, make_embedder, tiny_tokenizer

from hf_kadapter.retrieval.retriever import RealmStyleRetriever

# Stated in docs/performance.md: the smallest cosine between a document's float32 and half-precision embeddings.
MIN_COSINE = {torch.bfloat16: 0.99, torch.float16: 0.999}


def corpus() -> Dataset:
    return Dataset.from_dict({"id": [d[0] for d in DOCS], "title": [d[1] for d in DOCS], "text": [d[2] for d in DOCS]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_embeddings_stay_close_and_the_weights_float32(tmp_path, dtype):
    retriever = RealmStyleRetriever(make_embedder(dim=16), tiny_tokenizer(tmp_path))
    weights = {k: v.clone() for k, v in retriever.embedder.state_dict().items()}
    full = retriever.embed_corpus(corpus(), batch_size=3, progress=False)
    half = retriever.embed_corpus(corpus(), batch_size=3, progress=False, dtype=dtype)
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # it did compute in half precision
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=-1)
    assert cosine.min() >= MIN_COSINE[dtype], cosine
    assert all(torch.equal(v, weights[k]) for k, v in retriever.embedder.state_dict().items())
    assert {v.dtype for v in retriever.embedder.state_dict().values()} == {torch.float32}


def test_the_build_state_records_the_precision(tmp_path):
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    folder = tmp_path / "build"
    index = retriever.build_index(corpus(), batch_size=3, output_dir=folder, progress=False, dtype="bfloat16")
    assert len(index) == len(DOCS)
    state = (folder / "build_state.json").read_text()
    assert '"compute_dtype": "bfloat16"' in state
    with pytest.raises(ValueError, match="differs in \\['compute_dtype'\\]"):
        retriever.build_index(corpus(), batch_size=3, output_dir=folder, progress=False)
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16"):
        retriever.embed_corpus(corpus(), progress=False, dtype="int8")
