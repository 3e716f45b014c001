"""Bad input, as a user would give it, over every loader and every saved-folder kind: each case ends in a clear error
naming the file, line, row or tensor and the fix, or in a counted skip where skipping was asked for, never in a
silent wrong answer or a bare error from deep inside a library.

HF_KADAPTER_RELIABILITY_REPORT=bad.json python -m pytest -q tests/test_reliability_bad_input.py  writes the counts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import batch, make_model, tiny_adapter
from faults import Tally
from safetensors.torch import load_file, save_file
from test_kadapter_feature_cache import factual, toy_dataset
from test_pelt_build import CORPUS, bert_tokenizer, tiny_bert
from test_retrieval_retriever import DOCS, make_embedder, tiny_tokenizer
from transformers import AutoModel

import hf_kadapter as hk
from hf_kadapter.kadapter.data import (
    DataFormatError,
    DataReport,
    load_dependency_records,
    load_entity_typing,
    load_factual,
    load_multiple_choice,
    load_relation,
    load_squad,
)
from hf_kadapter.kadapter.feature_cache import FeatureCache, build_feature_cache
from hf_kadapter.pelt import EntityLookupTable, PELTTokenizer, build_entity_table, load_entity_corpus
from hf_kadapter.retrieval import DocumentIndex, RealmStyleRetriever, RetrieverEmbedder
from hf_kadapter.utils.io import DamagedFileError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TALLY = Tally("bad_input")
CASES: dict[str, tuple[str, Callable]] = {}
FIX = "save or build it again"  # the fix every damaged-file error names


def case(name: str, outcome: str = "error"):
    def register(function):
        CASES[name] = (outcome, function)
        return function

    return register


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def copy(folder: Path, tmp: Path) -> Path:
    target = tmp / folder.name
    shutil.copytree(folder, target)
    return target


class Env:
    """Saved folders of every kind, built once; each case copies the one it damages."""

    def __init__(self, root: Path, base_dirs: dict[str, str]):
        self.root, self.base_dirs = root, base_dirs
        self.kadapter = root / "kadapter"
        self.model = make_model(base_dirs["bert"])
        self.model.save_pretrained(self.kadapter)
        self.full = root / "kadapter-full"
        trained = make_model(base_dirs["bert"], freeze_base=False)
        trained.save_pretrained(self.full)
        self.bert_tokenizer = bert_tokenizer(root / "vocab")
        self.mlm = tiny_bert(len(self.bert_tokenizer))
        self.table = root / "table"
        build_entity_table(self.mlm, self.bert_tokenizer, CORPUS[:3], progress=False).save_pretrained(self.table)
        self.index = root / "index"
        torch.manual_seed(0)
        DocumentIndex(["a", "b", "c"], torch.randn(3, 8)).save_pretrained(self.index)
        self.faiss = root / "faiss"
        DocumentIndex(["a", "b", "c"], torch.randn(3, 8), backend="faiss", faiss_index="hnsw").save_pretrained(self.faiss)
        self.retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(root))
        self.retriever.build_index(corpus_list(), batch_size=4, max_length=32, progress=False)
        self.retriever_dir = root / "retriever"
        self.retriever.save_pretrained(self.retriever_dir)
        self.pelt_tokenizer = root / "pelt-tokenizer"
        PELTTokenizer(self.bert_tokenizer, entity_vocab=["Q1"]).save_pretrained(self.pelt_tokenizer)
        self.factual = factual(base_dirs["bert"])
        self.cache = build_feature_cache(self.factual, toy_dataset(size=4), root / "cache", progress=False).path


def corpus_list() -> list[dict]:
    return [{"id": d, "title": t, "text": x} for d, t, x in DOCS]


@pytest.fixture(scope="module")
def env(tmp_path_factory, base_dirs) -> Env:
    torch.set_num_threads(1)
    return Env(tmp_path_factory.mktemp("bad-input"), base_dirs)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    TALLY.write()


# ---------------------------------------------------------------------------------------------------------------
# Data files: every loader, bytes that are not UTF-8, broken JSON, empty files
# ---------------------------------------------------------------------------------------------------------------
LOADERS = {  # name: (loader, fixture, JSON Lines?)
    "load_factual": (load_factual, "trex_train.json", False),
    "load_relation": (load_relation, "tacred_train.json", False),
    "load_entity_typing": (load_entity_typing, "openentity_train.json", False),
    "load_dependency_records": (load_dependency_records, "dep_sentences.jsonl", True),
    "load_multiple_choice": (load_multiple_choice, "cosmosqa_tiny.jsonl", True),
    "load_squad": (load_squad, "squad_tiny.json", False),
    "load_entity_corpus": (load_entity_corpus, None, True),
}


def _data_file(name: str, tmp: Path) -> tuple[Path, bytes]:
    loader, fixture, _ = LOADERS[name]
    path = tmp / (fixture or "corpus.jsonl")
    data = (FIXTURES / fixture).read_bytes() if fixture else "\n".join(json.dumps(r) for r in CORPUS).encode()
    path.write_bytes(data)
    return path, data


def _second_record_line(data: bytes, jsonl: bool) -> int:
    """The line where the second record's text starts (JSON Lines: line 2; arrays: the second record's line)."""
    lines = data.split(b"\n")
    if jsonl:
        return 2
    holding = [i + 1 for i, line in enumerate(lines) if b'"' in line and (line.lstrip().startswith(b"{") or b"qas" in line)]
    return holding[1]


def _loader(name: str, path: Path, **kwargs):
    loader = LOADERS[name][0]
    if name == "load_entity_corpus":
        return loader(path, on_error=kwargs.get("on_error", "raise"), report=kwargs.get("report"))
    return loader(path, **kwargs)


def _with_bad_byte(name: str, tmp: Path) -> tuple[Path, int]:
    """A copy of the loader's fixture with one 0xff byte inside a string of one record (not the first)."""
    path, data = _data_file(name, tmp)
    if name == "load_squad":
        target = data.index(b'"where did the cat sit ?"') + 1  # inside the question's text
        line = data.count(b"\n", 0, data.rindex(b'"id"', 0, target)) + 1  # questions are located by their id
    else:
        jsonl = LOADERS[name][2]
        line = _second_record_line(data, jsonl)
        start = sum(len(x) + 1 for x in data.split(b"\n")[: line - 1])
        target = min(data.find(opening, start) + len(opening) for opening in (b': "', b'["') if opening in data[start:])
    path.write_bytes(data[:target] + b"\xff" + data[target:])
    return path, line


for _name in LOADERS:

    @case(f"{_name}:non-utf8-byte")
    def _non_utf8(env, tmp, name=_name):
        path, line = _with_bad_byte(name, tmp)
        with pytest.raises(DataFormatError) as caught:
            _loader(name, path)
        message = str(caught.value)
        assert str(path) in message and f"line {line}" in message and "not UTF-8" in message and "0xff" in message
        assert "on_error='skip'" in message

    @case(f"{_name}:non-utf8-byte-skipped", outcome="skipped")
    def _non_utf8_skipped(env, tmp, name=_name):
        path, _ = _with_bad_byte(name, tmp)
        report = DataReport()
        kept = _loader(name, path, on_error="skip", report=report)
        assert report.skipped == 1 and any("<encoding>" in reason for reason in report.reasons) and len(kept) > 0

    @case(f"{_name}:empty-file")
    def _empty(env, tmp, name=_name):
        path = tmp / "empty.json"
        path.write_text("" if name != "load_squad" else "{}")
        with pytest.raises(DataFormatError, match="empty.json"):
            _loader(name, path)

    if LOADERS[_name][2]:

        @case(f"{_name}:invalid-json-line")
        def _bad_line(env, tmp, name=_name):
            path, data = _data_file(name, tmp)
            lines = data.split(b"\n")
            lines[1] = lines[1][: len(lines[1]) // 2]  # a record cut in half
            path.write_bytes(b"\n".join(lines))
            with pytest.raises(DataFormatError, match=r"line 2, field '<json>': invalid JSON"):
                _loader(name, path)

        @case(f"{_name}:invalid-json-line-skipped", outcome="skipped")
        def _bad_line_skipped(env, tmp, name=_name):
            path, data = _data_file(name, tmp)
            lines = data.split(b"\n")
            lines[1] = lines[1][: len(lines[1]) // 2]
            path.write_bytes(b"\n".join(lines))
            report = DataReport()
            _loader(name, path, on_error="skip", report=report)
            assert report.skipped == 1 and any("invalid JSON" in reason for reason in report.reasons)

    else:

        @case(f"{_name}:truncated-json")
        def _truncated(env, tmp, name=_name):
            path, _ = _data_file(name, tmp)
            truncate(path, 0.6)
            with pytest.raises(DataFormatError, match=r"line \d+, field '<json>': invalid JSON"):
                _loader(name, path)


# ---------------------------------------------------------------------------------------------------------------
# Saved folders: damaged, inconsistent or incomplete files are named
# ---------------------------------------------------------------------------------------------------------------
def _drop_keys(path: Path, prefix: str) -> None:
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(prefix)}
    save_file(tensors, path, metadata={"format": "pt"})


@case("kadapter:truncated-weights")
def _kadapter_weights(env, tmp):
    folder = copy(env.kadapter, tmp)
    truncate(folder / "model.safetensors")
    for load in (AutoModel.from_pretrained, hk.KAdapterModel.from_pretrained, env.model.load_adapter):
        with pytest.raises(DamagedFileError, match=rf"{folder}/model.safetensors is damaged.*{FIX}"):
            load(folder) if load is not env.model.load_adapter else load(folder, adapter_name="again")


@case("kadapter:garbage-header")
def _kadapter_header(env, tmp):
    folder = copy(env.kadapter, tmp)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"\x00" * 16 + data[24:])
    with pytest.raises(DamagedFileError, match="model.safetensors is damaged: its header is not valid JSON"):
        AutoModel.from_pretrained(folder)


@case("kadapter:truncated-config")
def _kadapter_config(env, tmp):
    folder = copy(env.kadapter, tmp)
    truncate(folder / "config.json")
    with pytest.raises(OSError, match="config.json"):
        AutoModel.from_pretrained(folder)


@case("kadapter:missing-adapter-tensors")
def _kadapter_adapters(env, tmp):
    folder = copy(env.kadapter, tmp)
    _drop_keys(folder / "model.safetensors", "adapters.factual.layers.1")
    for load in (AutoModel.from_pretrained, hk.KAdapterModel.from_pretrained):
        with pytest.raises(ValueError, match=r"lacks \d+ tensors of its adapters.*random weights.*save it again"):
            load(folder)
    with pytest.raises(ValueError, match="does not hold complete weights for adapter 'factual'"):
        env.model.load_adapter(folder, adapter_name="again")


@case("kadapter:missing-fusion-tensors")
def _kadapter_fusion(env, tmp):
    folder = copy(env.kadapter, tmp)
    _drop_keys(folder / "model.safetensors", "fusion.")
    with pytest.raises(ValueError, match=r"lacks \d+ tensors.*fusion\.") as caught:
        AutoModel.from_pretrained(folder)
    assert "random weights" in str(caught.value)


@case("kadapter:missing-base-tensors")
def _kadapter_base(env, tmp):
    folder = copy(env.full, tmp)
    _drop_keys(folder / "model.safetensors", "pretrained_model.encoder.layer.1.output")
    with pytest.raises(ValueError, match=r"lacks \d+ tensors.*pretrained_model\.encoder"):
        AutoModel.from_pretrained(folder)


@case("kadapter:truncated-shard-index")
def _kadapter_shards(env, tmp):
    folder = tmp / "sharded"
    env.model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    truncate(folder / "model.safetensors.index.json")
    with pytest.raises(DamagedFileError, match=r"model.safetensors.index.json is damaged: invalid JSON at line"):
        AutoModel.from_pretrained(folder)


@case("kadapter:truncated-shard")
def _kadapter_shard(env, tmp):
    folder = tmp / "sharded"
    env.model.save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    truncate(shard)
    with pytest.raises(DamagedFileError, match=rf"{shard.name} is damaged"):
        AutoModel.from_pretrained(folder)


@case("entity_table:truncated-tensors")
def _table_tensors(env, tmp):
    folder = copy(env.table, tmp)
    truncate(folder / "entity_table.safetensors")
    with pytest.raises(DamagedFileError, match=rf"entity_table.safetensors is damaged.*{FIX}"):
        EntityLookupTable.from_pretrained(folder)


@case("entity_table:truncated-vocab")
def _table_vocab(env, tmp):
    folder = copy(env.table, tmp)
    truncate(folder / "entity_vocab.json")
    with pytest.raises(DamagedFileError, match=r"entity_vocab.json is damaged: invalid JSON at line 1, column \d+"):
        EntityLookupTable.from_pretrained(folder)


@case("entity_table:vocab-not-utf8")
def _table_utf8(env, tmp):
    folder = copy(env.table, tmp)
    (folder / "entity_vocab.json").write_bytes(b'{"x": "\xff"}')
    with pytest.raises(DamagedFileError, match=r"entity_vocab.json is damaged: byte 7 \(line 1\) is not UTF-8"):
        EntityLookupTable.from_pretrained(folder)


@case("entity_table:missing-config")
def _table_config(env, tmp):
    folder = copy(env.table, tmp)
    (folder / "entity_table_config.json").unlink()
    with pytest.raises(OSError, match="has no entity_table_config.json: it is not an entity table"):
        EntityLookupTable.from_pretrained(folder)


@case("entity_table:files-from-two-saves")
def _table_mix(env, tmp):
    folder = copy(env.table, tmp)
    vocab = json.loads((folder / "entity_vocab.json").read_text())
    vocab["counts"][0] += 1
    (folder / "entity_vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="counts in entity_vocab.json and entity_table.safetensors differ"):
        EntityLookupTable.from_pretrained(folder)


@case("entity_table:nan-sums-on-disk")
def _table_nan(env, tmp):
    folder = copy(env.table, tmp)
    tensors = load_file(folder / "entity_table.safetensors")
    tensors["sums"][1, 3] = float("nan")
    save_file(tensors, folder / "entity_table.safetensors", metadata={"format": "pt", "format_version": "1"})
    vocab = json.loads((folder / "entity_vocab.json").read_text())
    with pytest.raises(ValueError, match=rf"entities \['{vocab['entity_ids'][1]}'\].*NaN or inf.*float32"):
        EntityLookupTable.from_pretrained(folder)


@case("document_index:truncated-embeddings")
def _index_embeddings(env, tmp):
    folder = copy(env.index, tmp)
    truncate(folder / "embeddings.safetensors")
    with pytest.raises(DamagedFileError, match=rf"embeddings.safetensors is damaged.*{FIX}"):
        DocumentIndex.from_pretrained(folder)


@case("document_index:truncated-ids")
def _index_ids(env, tmp):
    folder = copy(env.index, tmp)
    truncate(folder / "ids.json")
    with pytest.raises(DamagedFileError, match="ids.json is damaged: invalid JSON"):
        DocumentIndex.from_pretrained(folder)


@case("document_index:ids-from-another-save")
def _index_mix(env, tmp):
    folder = copy(env.index, tmp)
    (folder / "ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="lists 2 documents but embeddings.safetensors holds embeddings"):
        DocumentIndex.from_pretrained(folder)


@case("document_index:truncated-config")
def _index_config(env, tmp):
    folder = copy(env.index, tmp)
    truncate(folder / "index_config.json")
    with pytest.raises(DamagedFileError, match="index_config.json is damaged"):
        DocumentIndex.from_pretrained(folder)


@case("document_index:nan-on-disk")
def _index_nan(env, tmp):
    folder = copy(env.index, tmp)
    tensors = load_file(folder / "embeddings.safetensors")
    tensors["embeddings"][2, 0] = float("inf")
    save_file(tensors, folder / "embeddings.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"documents \['c'\].*NaN or inf"):
        DocumentIndex.from_pretrained(folder)


@case("document_index:nan-on-disk-memory-mapped")
def _index_nan_mapped(env, tmp):
    """A memory-mapped index is opened without reading its vectors; a non-finite row is refused when it is read."""
    folder = copy(env.index, tmp)
    tensors = load_file(folder / "embeddings.safetensors")
    tensors["embeddings"][2] = float("nan")
    save_file(tensors, folder / "embeddings.safetensors", metadata={"format": "pt"})
    mapped = DocumentIndex.from_pretrained(folder, mmap=True)
    assert mapped.get(["a", "b"]).shape == (2, 8)  # the finite rows stay readable
    for read in (lambda: mapped.search(torch.randn(2, 8), 2), lambda: mapped.get(["c"])):
        with pytest.raises(ValueError, match=r"memory-mapped embeddings hold NaN or inf at rows \[2\]"):
            read()
    mapped.chunk_size = 2  # chunked search over the map, and IVF-PQ built from it, refuse the row too
    with pytest.raises(ValueError, match=r"at rows \[2\]"):
        mapped.search(torch.randn(2, 8), 2)
    if importlib.util.find_spec("faiss") is not None:
        with pytest.raises(ValueError, match=r"at rows \[2\]"):
            compressed = DocumentIndex.from_pretrained(
                folder, mmap=True, backend="faiss", faiss_index="ivfpq", nlist=1, pq_m=2, pq_bits=1
            )
            compressed.search(torch.randn(2, 8), 2)  # (faiss is built from the map on first use)


@case("document_index:truncated-faiss")
def _index_faiss(env, tmp):
    folder = copy(env.faiss, tmp)
    truncate(folder / "faiss.index")
    with pytest.raises(DamagedFileError, match="faiss.index is damaged: faiss cannot read it"):
        DocumentIndex.from_pretrained(folder)


@case("retriever:missing-config")
def _retriever_config(env, tmp):
    folder = copy(env.retriever_dir, tmp)
    (folder / "retriever_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a saved RealmStyleRetriever.*save_pretrained"):
        RealmStyleRetriever.from_pretrained(folder)


@case("retriever:truncated-config")
def _retriever_truncated(env, tmp):
    folder = copy(env.retriever_dir, tmp)
    truncate(folder / "retriever_config.json")
    with pytest.raises(DamagedFileError, match="retriever_config.json is damaged"):
        RealmStyleRetriever.from_pretrained(folder)


@case("retriever:truncated-embedder-weights")
def _retriever_weights(env, tmp):
    folder = copy(env.retriever_dir, tmp)
    truncate(folder / "embedder" / "model.safetensors")
    for load in (RealmStyleRetriever.from_pretrained, lambda f: RetrieverEmbedder.from_pretrained(f / "embedder")):
        with pytest.raises(DamagedFileError, match="embedder/model.safetensors is damaged"):
            load(folder)


@case("feature_cache:truncated-metadata")
def _cache_metadata(env, tmp):
    folder = copy(env.cache, tmp)
    truncate(folder / "metadata.json")
    with pytest.raises(DamagedFileError, match="metadata.json is damaged: invalid JSON"):
        FeatureCache(folder)


@case("feature_cache:truncated-offsets")
def _cache_offsets(env, tmp):
    folder = copy(env.cache, tmp)
    truncate(folder / "offsets.npy", 0.9)
    with pytest.raises(DamagedFileError, match="offsets.npy is damaged"):
        FeatureCache(folder)[0]


@case("feature_cache:states-of-another-shape")
def _cache_states(env, tmp):
    folder = copy(env.cache, tmp)
    import numpy as np

    np.save(folder / "hidden_states.npy", np.zeros((3, 1, 2), dtype=np.float32))
    with pytest.raises(DamagedFileError, match=r"hidden_states.npy is damaged: it holds an array \(3, 1, 2\)"):
        FeatureCache(folder)[0]


@case("pelt_tokenizer:truncated-config")
def _pelt_tokenizer(env, tmp):
    folder = copy(env.pelt_tokenizer, tmp)
    truncate(folder / "pelt_tokenizer_config.json")
    with pytest.raises(DamagedFileError, match="pelt_tokenizer_config.json is damaged"):
        PELTTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Corpora for build_index: checked before any work
# ---------------------------------------------------------------------------------------------------------------
class _Untouchable:
    """An embedder that fails the test if anything is embedded (the corpus must be refused first)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name in ("embed_documents", "embed_queries"):
            raise AssertionError("the corpus was embedded before being checked")
        return getattr(self.inner, name)


def _refused_before_embedding(env, corpus, pattern: str) -> None:
    retriever = RealmStyleRetriever(_Untouchable(env.retriever.embedder), env.retriever.tokenizer)
    with pytest.raises(ValueError, match=pattern):
        retriever.build_index(corpus, progress=False)


CORPORA = {
    "text-column-named-otherwise": (
        lambda: __import__("datasets").Dataset.from_dict({"id": ["a"], "passage": ["x"]}),
        r"no \['text'\] column \(columns: \['id', 'passage'\]\).*rename_column\('passage', 'text'\)",
    ),
    "no-id-column": (lambda: __import__("datasets").Dataset.from_dict({"text": ["x"]}), r"no \['id'\] column"),
    "empty-dataset": (lambda: __import__("datasets").Dataset.from_dict({"id": [], "text": []}), "corpus is empty"),
    "empty-list": (lambda: [], "corpus is empty"),
    "none-text": (lambda: corpus_list()[:2] + [{"id": "z", "text": None}], r"Corpus row 2 \(id 'z'\) has text None"),
    "none-id": (lambda: [{"id": None, "text": "x"}], "Corpus row 0 has id None"),
    "duplicate-ids": (lambda: corpus_list() + corpus_list()[:1], "Corpus row 7 repeats id 'd0'"),
    "not-a-dict": (lambda: ["just text"], "Corpus row 0 is a str, not a dict"),
    "title-not-a-string": (lambda: [{"id": "a", "title": 3, "text": "x"}], "has title 3: titles must be strings"),
    "text-not-a-string": (lambda: [{"id": "a", "text": 3}], "has text 3: store texts as strings"),
}
for _name, (_corpus, _pattern) in CORPORA.items():
    case(f"build_index:{_name}")(lambda env, tmp, c=_corpus, p=_pattern: _refused_before_embedding(env, c(), p))


@case("build_index:add-an-existing-id")
def _existing(env, tmp):
    retriever = RealmStyleRetriever(_Untouchable(env.retriever.embedder), env.retriever.tokenizer,
                                    index=env.retriever.index)  # fmt: skip
    with pytest.raises(ValueError, match=r"documents \['d1'\] are already in the index"):
        retriever.add_documents([{"id": "d1", "text": "again"}])


@case("build_index:list-corpus-rebuilt", outcome="correct")
def _rebuilt(env, tmp):
    retriever = RealmStyleRetriever(env.retriever.embedder, env.retriever.tokenizer)
    retriever.build_index(corpus_list()[:3], max_length=32, progress=False)
    new = [{"id": "n1", "title": "oslo", "text": "oslo is the capital of norway."}]
    retriever.build_index(new, max_length=32, progress=False)
    assert retriever.retrieve(["oslo"], k=1, max_length=32).texts == [[new[0]["text"]]]


@case("build_index:edited-list-corpus-resumed")
def _edited(env, tmp):
    retriever = RealmStyleRetriever(env.retriever.embedder, env.retriever.tokenizer)
    retriever.build_index(corpus_list(), batch_size=3, max_length=32, output_dir=tmp / "build", progress=False)
    edited = corpus_list()
    edited[4]["text"] = "lisbon is a city by the sea."
    with pytest.raises(ValueError, match=r"different settings \(differs in \['corpus_digest'\]\).*delete"):
        retriever.build_index(edited, batch_size=3, max_length=32, output_dir=tmp / "build", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf refused where they enter
# ---------------------------------------------------------------------------------------------------------------
def _poisoned():
    vectors = torch.randn(4, 8)
    vectors[2, 5] = float("nan")
    return vectors


@case("nan:document-embeddings")
def _nan_documents(env, tmp):
    with pytest.raises(ValueError, match=r"documents \['c'\] \(1 in all\) hold NaN.*top hit of every query"):
        DocumentIndex(["a", "b", "c", "d"], _poisoned())
    index = DocumentIndex(["a"], torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"documents \['z'\]"):
        index.add(["x", "y", "z", "w"], _poisoned())
    assert len(index) == 1


for _backend in ("exact", "faiss"):

    @case(f"nan:query-{_backend}")
    def _nan_query(env, tmp, backend=_backend):
        kwargs = {"faiss_index": "hnsw"} if backend == "faiss" else {}
        index = DocumentIndex(["a", "b"], torch.randn(2, 8), backend=backend, **kwargs)
        with pytest.raises(ValueError, match=r"Queries \(rows\) \[2\] \(1 in all\) hold NaN"):
            index.search(_poisoned(), k=1)


class _NaNEmbedder(torch.nn.Module):
    def __init__(self, inner, side: str):
        super().__init__()
        self.inner, self.side = inner, side

    def _poison(self, out):
        return out.masked_fill(torch.arange(len(out))[:, None] == len(out) - 1, float("nan"))

    def embed_queries(self, **kwargs):
        out = self.inner.embed_queries(**kwargs)
        return self._poison(out) if self.side == "queries" else out

    def embed_documents(self, **kwargs):
        out = self.inner.embed_documents(**kwargs)
        return self._poison(out) if self.side == "documents" else out


@case("nan:retrieve-query")
def _nan_retrieve(env, tmp):
    retriever = RealmStyleRetriever(_NaNEmbedder(env.retriever.embedder, "queries"), env.retriever.tokenizer,
                                    index=env.retriever.index, documents=env.retriever.documents)  # fmt: skip
    with pytest.raises(ValueError, match=r"embeddings of queries \(rows\) \[1\]"):
        retriever.retrieve(["paris", "oslo"], k=1, max_length=32)


@case("nan:embed-corpus")
def _nan_corpus(env, tmp):
    retriever = RealmStyleRetriever(_NaNEmbedder(env.retriever.embedder, "documents"), env.retriever.tokenizer)
    with pytest.raises(ValueError, match=r"embeddings of documents \['d6'\].*float32"):
        retriever.build_index(corpus_list(), batch_size=7, max_length=32, progress=False)


@case("nan:entity-table-sums")
def _nan_table(env, tmp):
    sums = torch.randn(3, 4)
    sums[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"entities \['Q1'\].*NaN or inf"):
        EntityLookupTable(["Q1", "Q2", "Q3"], sums, torch.ones(3, dtype=torch.long))


@case("nan:pelt-build-model-output")
def _nan_pelt(env, tmp):
    broken = tiny_bert(len(env.bert_tokenizer))
    with torch.no_grad():
        broken.cls.predictions.transform.dense.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf vectors for \d+ masked mentions \(entities \['Q"):
        build_entity_table(broken, env.bert_tokenizer, CORPUS[:2], progress=False)


@case("nan:feature-cache-hidden-states")
def _nan_cache(env, tmp):
    model = factual(env.base_dirs["bert"])
    with torch.no_grad():  # token 3 is never drawn by toy_dataset (ids 4..VOCAB): only row 1 gets it
        model.kadapter.pretrained_model.embeddings.word_embeddings.weight[3] = float("nan")
    data = toy_dataset(size=4)
    data = data.map(lambda row, i: {"input_ids": [3, *row["input_ids"][1:]] if i == 1 else row["input_ids"]},
                    with_indices=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"NaN or inf hidden states for dataset rows \[1\]"):
        build_feature_cache(model, data, tmp / "cache", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Labels and positions that point into padding
# ---------------------------------------------------------------------------------------------------------------
@case("padding:dependency-label")
def _dependency_label(env, tmp):
    model = make_model(env.base_dirs["bert"], hk.KAdapterForDependencyPretraining, max_head_positions=16)
    inputs = batch(length=9, pad_last=3)
    labels = torch.full((3, 9), -100)
    labels[2, 1] = 7  # a head in the last example's padding
    with pytest.raises(ValueError, match=r"point into padding .* \(example, token\) \[\[2, 1\]\].*preprocess_dependency"):
        model(**inputs, labels=labels)


@case("padding:entity-marker")
def _entity_marker(env, tmp):
    model = make_model(env.base_dirs["bert"], hk.KAdapterForEntityTyping, num_labels=3)
    with pytest.raises(ValueError, match=r"entity_positions points into padding for examples \[2\] \(positions \[8\]"):
        model(**batch(length=9, pad_last=3), entity_positions=torch.tensor([1, 2, 8]))


@case("padding:relation-markers")
def _relation_markers(env, tmp):
    for head in (hk.KAdapterForRelationClassification, hk.KAdapterForFactualPretraining):
        model = make_model(env.base_dirs["bert"], head, num_labels=3, adapters={"factual": tiny_adapter()})
        with pytest.raises(ValueError, match=r"object_positions points into padding for examples \[2\]"):
            model(**batch(length=9, pad_last=3), subject_positions=torch.tensor([1, 1, 1]),
                  object_positions=torch.tensor([3, 3, 7]))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The battery (after every case is registered)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES) or ["none"])
def test_bad_input(name, env, tmp_path):
    outcome, function = CASES[name]
    function(env, tmp_path)
    TALLY.add(name.split(":")[0], outcome, True)
