"""RetrieverEmbedder: shapes, pooling, shared vs separate towers, save/load, Auto classes, push_to_hub."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, BertConfig, BertForMaskedLM, BertModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_kadapter  # noqa: F401  (registers the Auto classes)
from hf_kadapter.retrieval.configuration_retriever import RetrieverEmbedderConfig
from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder, RetrieverEmbedderOutput

torch.set_num_threads(1)

ENCODER = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(**ENCODER)).save_pretrained(folder)
    return folder


def batch(size=3, length=7, pad=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 64, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length - pad :] = 0
    input_ids[0, length - pad :] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2 :] = 1  # "title [SEP] text"
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def test_shapes_and_encoder_weights(encoder_dir):
    model = RetrieverEmbedder.from_encoder(str(encoder_dir), projection_dim=16).eval()
    assert model.config.encoder_name_or_path == str(encoder_dir)
    assert model.embedding_dim == 16
    encoder = BertModel.from_pretrained(encoder_dir)
    torch.testing.assert_close(
        model.query_tower.encoder.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight
    )
    assert not any("pooler" in name for name, _ in model.named_parameters())
    inputs = batch()
    assert model.embed_queries(**inputs).shape == (3, 16)
    assert model.embed_documents(**inputs).shape == (3, 16)
    out = model(**inputs, document_input_ids=batch(5)["input_ids"])
    assert isinstance(out, RetrieverEmbedderOutput)
    assert out.query_embeddings.shape == (3, 16) and out.document_embeddings.shape == (5, 16)
    torch.testing.assert_close(out.scores, out.query_embeddings @ out.document_embeddings.T)
    assert model(document_input_ids=inputs["input_ids"]).query_embeddings is None
    with pytest.raises(ValueError, match="input_ids"):
        model()
    # No projection: the pooled hidden state itself.
    bare = RetrieverEmbedder.from_encoder(encoder, projection_dim=None).eval()
    with torch.no_grad():
        expected = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        got = bare.embed_queries(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(got, expected[:, 0])


def test_cls_vs_mean_pooling():
    encoder = BertModel(BertConfig(**ENCODER), add_pooling_layer=False).eval()
    inputs = batch()
    with torch.no_grad():
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        for pooling, expected in (("cls", hidden[:, 0]), ("mean", mean)):
            model = RetrieverEmbedder.from_encoder(encoder, projection_dim=None, pooling=pooling).eval()
            torch.testing.assert_close(
                model.embed_queries(inputs["input_ids"], inputs["attention_mask"]), expected, rtol=1e-5, atol=1e-5
            )
    # Mean pooling ignores padding: padded and unpadded versions of the first sequence agree.
    model = RetrieverEmbedder.from_encoder(encoder, pooling="mean", projection_dim=8).eval()
    with torch.no_grad():
        padded = model.embed_queries(inputs["input_ids"][:1], inputs["attention_mask"][:1])
        trimmed = model.embed_queries(inputs["input_ids"][:1, :5], inputs["attention_mask"][:1, :5])
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        RetrieverEmbedderConfig(encoder_config=BertConfig(**ENCODER), pooling="max")


def test_shared_vs_separate_towers():
    encoder = BertModel(BertConfig(**ENCODER))
    inputs = batch()
    shared = RetrieverEmbedder.from_encoder(encoder, projection_dim=8).eval()
    assert shared.document_tower is shared.query_tower
    torch.testing.assert_close(shared.embed_queries(**inputs), shared.embed_documents(**inputs))
    separate = RetrieverEmbedder.from_encoder(encoder, projection_dim=8, shared=False).eval()
    assert separate.document_tower is not separate.query_tower
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in separate.parameters()) == 2 * n_shared
    # Both encoders start from the same pretrained weights, the towers train independently.
    for a, b in zip(
        separate.query_tower.encoder.parameters(), separate.document_tower.encoder.parameters(), strict=True
    ):
        assert torch.equal(a, b) and a is not b
    separate.train()
    separate.embed_queries(**inputs).sum().backward()
    assert separate.query_tower.projection.weight.grad is not None
    assert separate.document_tower.projection.weight.grad is None


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_identical_outputs(tmp_path, shared):
    model = RetrieverEmbedder.from_encoder(
        BertModel(BertConfig(**ENCODER)), projection_dim=8, pooling="mean", shared=shared
    ).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = RetrieverEmbedder.from_pretrained(tmp_path).eval()
    assert loaded.config.pooling == "mean" and loaded.config.shared is shared
    assert (loaded.document_tower is loaded.query_tower) is shared
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(loaded.embed_queries(**inputs), model.embed_queries(**inputs))
        assert torch.equal(loaded.embed_documents(**inputs), model.embed_documents(**inputs))


def test_from_task_model_and_errors():
    masked_lm = BertForMaskedLM(BertConfig(**ENCODER))
    model = RetrieverEmbedder.from_encoder(masked_lm, projection_dim=4)
    torch.testing.assert_close(
        model.query_tower.encoder.embeddings.word_embeddings.weight, masked_lm.bert.embeddings.word_embeddings.weight
    )
    with pytest.raises(ValueError, match="projection_dim"):
        RetrieverEmbedder.from_encoder(masked_lm, projection_dim=0)
    with pytest.raises(ValueError, match="encoder_kwargs"):
        RetrieverEmbedder.from_encoder(masked_lm, encoder_kwargs={"revision": "x"})


def test_auto_classes(tmp_path):
    if "realm_embedder" not in CONFIG_MAPPING:
        # Registration lives in hf_kadapter/retrieval/__init__.py (lead); register here if it is not wired yet.
        AutoConfig.register("realm_embedder", RetrieverEmbedderConfig, exist_ok=True)
        AutoModel.register(RetrieverEmbedderConfig, RetrieverEmbedder, exist_ok=True)
    model = RetrieverEmbedder.from_encoder(BertModel(BertConfig(**ENCODER)), projection_dim=8).eval()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, RetrieverEmbedderConfig)
    assert isinstance(config.encoder_config, BertConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RetrieverEmbedder)
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(loaded.embed_queries(**inputs), model.embed_queries(**inputs))


def test_push_to_hub(monkeypatch):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        import os

        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["commit_message"] = kwargs.get("commit_message")
        reloaded = RetrieverEmbedder.from_pretrained(folder_path)
        uploaded["dim"] = reloaded.embedding_dim
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = RetrieverEmbedder.from_encoder(BertModel(BertConfig(**ENCODER)), projection_dim=8)
    assert model.push_to_hub("me/realm-embedder", commit_message="hi") == "commit"
    assert uploaded["repo_id"] == "me/realm-embedder"
    assert "model.safetensors" in uploaded["files"] and "config.json" in uploaded["files"]
    assert uploaded["commit_message"] == "hi"
    assert uploaded["dim"] == 8


def test_a_kadapter_model_is_a_retriever_encoder(tmp_path):
    """Knowledge adapters compose with retrieval: a K-Adapter model embeds queries and documents."""
    from conftest import BASES, batch, make_model
    from transformers import BertConfig, BertModel

    import hf_kadapter as hk
    from hf_kadapter.retrieval import RetrieverEmbedder

    torch.manual_seed(0)
    BertModel(BertConfig(**BASES["bert"][2]), add_pooling_layer=False).save_pretrained(tmp_path / "base")
    kadapter = make_model(str(tmp_path / "base"))
    embedder = RetrieverEmbedder.from_encoder(kadapter, projection_dim=16).eval()
    inputs = batch()
    queries = embedder.embed_queries(inputs["input_ids"], inputs["attention_mask"])
    assert queries.shape == (3, 16)
    embedder.save_pretrained(tmp_path / "embedder")
    reloaded = RetrieverEmbedder.from_pretrained(tmp_path / "embedder").eval()
    assert isinstance(reloaded.query_tower.encoder, hk.KAdapterModel)
    assert torch.allclose(reloaded.embed_queries(inputs["input_ids"], inputs["attention_mask"]), queries, atol=1e-5)
