"""Everything shareable round-trips through push_to_hub and from_pretrained("<repo id>") on a local fake Hub; cards
(library_name that loads the folder, base_model as a Hub id, user tags, a snippet of the right class); a base
recorded as a local path is refused without its Hub id; the remote-code files keep their helper copies identical."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DOCS, batch, char_tokenizer, make_model, tiny_bert_config
from datasets import Dataset
from huggingface_hub import HfApi
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertForMaskedLM,
    BertModel,
)

import hf_kadapter as hk
from hf_kadapter.kadapter import modeling_kadapter
from hf_kadapter.retrieval import modeling_retriever
from hf_kadapter.utils import hub, modeling


def card_of(fake_hub, repo_id: str):
    card = fake_hub.card(repo_id)
    return card, card.data.to_dict()


# ----- the remote-code files carry identical copies of the shared helpers -------------------------------------------
@pytest.mark.parametrize("remote", [modeling_kadapter, modeling_retriever], ids=["kadapter", "retriever"])
def test_remote_code_copies_are_identical(remote):
    for name in ("is_hub_id", "hub_base_model", "model_card", "card_is_ours", "tag_model_card", "push_folder_to_hub",
                 "pop_push_kwargs"):  # fmt: skip
        assert inspect.getsource(getattr(remote, name)) == inspect.getsource(getattr(hub, name)), name
    assert remote.CARD_MARKER == hub.CARD_MARKER and remote.PUSH_KWARGS == hub.PUSH_KWARGS
    source = inspect.getsource(remote)
    assert "from hf_kadapter" not in source and "from .." not in source  # nothing but same-folder relative imports
    for name in ("_base_init_kwargs", "_bare_encoder"):
        assert inspect.getsource(getattr(modeling_retriever, name)) == inspect.getsource(
            getattr(modeling_kadapter, name)
        )
    assert inspect.getsource(modeling_kadapter.keep_pretrained_weights) == inspect.getsource(
        modeling.keep_pretrained_weights
    )


def test_embedder_ships_as_remote_code(tmp_path):
    torch.manual_seed(0)
    embedder = hk.RetrieverEmbedder.from_encoder(
        BertModel(tiny_bert_config(), add_pooling_layer=False), projection_dim=8
    )
    embedder.save_pretrained(tmp_path / "embedder")
    config = json.loads((tmp_path / "embedder" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_retriever.RetrieverEmbedder"
    assert {"modeling_retriever.py", "configuration_retriever.py"} <= set(os.listdir(tmp_path / "embedder"))
    inputs = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.save(embedder.eval().embed_queries(**inputs), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_kadapter"] = None  # the package is not importable in this process
        import torch
        from transformers import AutoModel
        torch.set_num_threads(1)
        model = AutoModel.from_pretrained({str(tmp_path / "embedder")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = {{"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}}
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.allclose(model.embed_queries(**inputs), expected, atol=1e-6)
        print("REMOTE-OK")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "REMOTE-OK" in result.stdout, result.stderr[-3000:]


# ----- K-Adapter models and single adapters ---------------------------------------------------------------------------
def test_kadapter_task_model_and_single_adapter_round_trip(base_dirs, fake_hub):
    base = base_dirs["bert"]
    model = make_model(base, hk.KAdapterForSequenceClassification, num_labels=3)
    with pytest.raises(ValueError, match="base_model_id"):  # the base is a local folder nobody else has
        model.push_to_hub("me/kadapter-cls")
    assert not fake_hub.commits

    HfApi().upload_folder(repo_id="org/tiny-bert", folder_path=base)  # the base, published
    model.push_to_hub("me/kadapter-cls", base_model_id="org/tiny-bert", tags=["my-tag"])
    assert model.config.base_model_name_or_path == base  # the local record is kept
    uploaded = json.loads((fake_hub.snapshot("me/kadapter-cls") / "config.json").read_text())
    assert uploaded["base_model_name_or_path"] == "org/tiny-bert"
    card, meta = card_of(fake_hub, "me/kadapter-cls")
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/tiny-bert"
    assert {"my-tag", "kadapter"} <= set(meta["tags"])
    assert 'AutoModelForSequenceClassification.from_pretrained("me/kadapter-cls")' in card.text  # the task class

    loaded = hk.KAdapterForSequenceClassification.from_pretrained("me/kadapter-cls").eval()
    auto = AutoModelForSequenceClassification.from_pretrained("me/kadapter-cls").eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, expected) and torch.equal(auto(**inputs).logits, expected)

    # A single adapter goes onto another model on the same base, from the repo.
    target = hk.KAdapterModel.from_base(base, adapters={}).eval()
    target.load_adapter("me/kadapter-cls", name="factual")
    with torch.no_grad():
        assert torch.equal(target(**inputs).adapter_hidden_states[0], model.kadapter(**inputs).adapter_hidden_states[0])


def test_task_head_without_auto_class_gets_its_own_snippet(base_dir, tmp_path):
    make_model(base_dir, hk.KAdapterForEntityTyping, num_labels=2).save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert 'hf_kadapter.KAdapterForEntityTyping.from_pretrained("<this repo>")' in text
    assert "AutoModel.from_pretrained" not in text


# ----- PELT: entity tables and plugged models ----------------------------------------------------------------------------
@pytest.fixture
def pelt_parts(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config()).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    mlm = BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()  # a model loaded from a local folder
    corpus = [{"text": "paris is in france.", "mentions": [{"char_start": 0, "char_end": 5, "entity_id": "Q90"}]}]
    table = hk.build_entity_table(mlm, tokenizer, corpus, entity_names={"Q90": "paris"}, progress=False)
    return mlm, tokenizer, table


def test_entity_table_and_pelt_model_round_trip(pelt_parts, fake_hub):
    mlm, tokenizer, table = pelt_parts
    with pytest.raises(ValueError, match="base_model_id"):
        table.push_to_hub("me/entities")
    table.push_to_hub("me/entities", base_model_id="org/tiny-mlm", tags=["geo"])
    _, meta = card_of(fake_hub, "me/entities")
    assert meta["library_name"] == "hf_kadapter" and meta["base_model"] == "org/tiny-mlm" and "geo" in meta["tags"]
    reloaded = hk.EntityLookupTable.from_pretrained("me/entities")
    assert reloaded.entity_ids == table.entity_ids and torch.equal(reloaded.sums, table.sums)

    plugged = hk.PELTModel(mlm, table)
    plugged.push_to_hub("me/pelt", base_model_id="org/tiny-mlm")
    assert "entity_table/entity_table.safetensors" in fake_hub.commits[-1]["files"]
    _, meta = card_of(fake_hub, "me/pelt")
    assert meta["library_name"] == "hf_kadapter" and meta["base_model"] == "org/tiny-mlm"
    encoding = hk.PELTTokenizer(tokenizer, table)("paris is in [MASK] .", link=True, return_tensors="pt")
    assert (encoding["entity_positions"] >= 0).any()
    for loaded in (hk.PELTModel.from_pretrained("me/pelt"), AutoModelForMaskedLM.from_pretrained("me/pelt")):
        assert isinstance(loaded, hk.PELTModel) and loaded.table.entity_ids == table.entity_ids
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**encoding).logits, plugged(**encoding).logits)


# ----- retrieval: embedder, index, retriever, reader, knowledge-augmented MLM ---------------------------------------------
def test_retrieval_objects_round_trip(tmp_path, fake_hub):
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    encoder = BertModel(tiny_bert_config(), add_pooling_layer=False)
    embedder = hk.RetrieverEmbedder.from_encoder(encoder, projection_dim=8).eval()
    retriever = hk.RealmStyleRetriever(embedder, tokenizer)
    corpus = Dataset.from_dict({key: [d[i] for d in DOCS] for i, key in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=2, max_length=32, progress=False)

    embedder.push_to_hub("me/embedder", tags=["dense"])
    retriever.index.push_to_hub("me/index")
    retriever.push_to_hub("me/retriever")
    _, meta = card_of(fake_hub, "me/embedder")
    assert meta["library_name"] == "transformers" and "dense" in meta["tags"]  # AutoModel loads it (remote code)
    for repo in ("me/index", "me/retriever"):
        assert card_of(fake_hub, repo)[1]["library_name"] == "hf_kadapter"

    inputs = tokenizer(["paris"], return_tensors="pt")
    with torch.no_grad():
        expected = embedder.embed_queries(**inputs)
        assert torch.equal(AutoModel.from_pretrained("me/embedder").eval().embed_queries(**inputs), expected)
    index = hk.DocumentIndex.from_pretrained("me/index")
    assert index.ids == retriever.index.ids and torch.equal(index.embeddings, retriever.index.embeddings)
    loaded = hk.RealmStyleRetriever.from_pretrained("me/retriever")
    assert loaded.retrieve(["paris"], k=2).doc_ids == retriever.retrieve(["paris"], k=2).doc_ids

    torch.manual_seed(1)
    reader = hk.OpenQAReader(
        BertModel(tiny_bert_config(), add_pooling_layer=False), span_hidden_size=8, max_span_width=3
    )
    reader.push_to_hub("me/reader")
    assert card_of(fake_hub, "me/reader")[1]["library_name"] == "hf_kadapter"
    questions = hk.prepare_reader_inputs(
        tokenizer, ["where?"], [["paris is in france."]], max_length=32, max_span_width=3
    )
    with torch.no_grad():
        expected = reader.eval()(**questions).span_logits
        assert torch.equal(hk.OpenQAReader.from_pretrained("me/reader").eval()(**questions).span_logits, expected)

    torch.manual_seed(2)
    realm = hk.RealmKnowledgeAugmentedMLM(BertForMaskedLM(tiny_bert_config()), retriever, k=2, doc_max_length=24)
    realm.push_to_hub("me/realm")
    assert not any(f.startswith("retriever/embedder/model") for f in fake_hub.commits[-1]["files"])  # saved once
    masked = hk.salient_span_mlm_batch(["paris is in france."], tokenizer, seed=0, max_length=24, use_spacy=False)
    restored = hk.RealmKnowledgeAugmentedMLM.from_pretrained("me/realm").eval()
    assert restored.retriever.embedder is restored.embedder
    with torch.no_grad():
        assert torch.allclose(restored(**masked).loss, realm.eval()(**masked).loss, atol=1e-6)


def test_save_pretrained_with_push_to_hub_uploads_the_committed_folder(base_dirs, tmp_path, fake_hub):
    """save_pretrained(folder, push_to_hub=True, repo_id=..., tags=...) saves the folder, then uploads what
    push_to_hub uploads (card, table, retriever ...): not transformers' push of the commit's staging folder."""
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    encoder = BertModel(tiny_bert_config(), add_pooling_layer=False)
    embedder = hk.RetrieverEmbedder.from_encoder(encoder, projection_dim=8).eval()
    retriever = hk.RealmStyleRetriever(embedder, tokenizer)
    corpus = Dataset.from_dict({key: [d[i] for d in DOCS] for i, key in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=2, max_length=32, progress=False)
    mlm = BertForMaskedLM(tiny_bert_config()).eval()
    corpus = [{"text": "paris is in france.", "mentions": [{"char_start": 0, "char_end": 5, "entity_id": "Q90"}]}]
    table = hk.build_entity_table(mlm, tokenizer, corpus, entity_names={"Q90": "paris"}, progress=False)
    models = {
        "kadapter": (make_model(base_dirs["bert"]), "modeling_kadapter.py"),
        "embedder": (embedder, "model.safetensors"),
        "reader": (hk.OpenQAReader(encoder, span_hidden_size=8, max_span_width=3), "model.safetensors"),
        "pelt": (hk.PELTModel(mlm, table), "entity_table/entity_table.safetensors"),
        "realm": (hk.RealmKnowledgeAugmentedMLM(mlm, retriever, k=2), "retriever/index/embeddings.safetensors"),
    }
    for name, (model, companion) in models.items():
        extra = {"base_model_id": "org/tiny-bert"} if name == "kadapter" else {}  # its base is a local folder
        model.save_pretrained(tmp_path / name, push_to_hub=True, repo_id=f"me/{name}", tags=["mine"], **extra)
        files = fake_hub.commits[-1]["files"]
        assert "README.md" in files and companion in files and (tmp_path / name / companion).is_file(), name
        assert not any(".staging-" in f for f in files), name
        assert "mine" in card_of(fake_hub, f"me/{name}")[1]["tags"], name
