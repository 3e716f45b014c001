"""Building PELT entity tables: the vectors are the masked LM's own, computed as the paper says, and the build is
batched, seeded, resumable and splittable across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import AddedToken, ByteLevelBPETokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
)

import hf_kadapter as hk
from hf_kadapter.kadapter.data.records import DataFormatError, DataReport
from hf_kadapter.pelt.build import (
    _MaskedEncoder,
    build_entity_table,
    lm_head_transform,
    load_entity_corpus,
    sample_occurrences,
)
from hf_kadapter.pelt.table import EntityLookupTable, EntityTableMismatchError

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# A tiny corpus, tokenizers and masked LMs
# ---------------------------------------------------------------------------------------------------------------
def record(text: str, *mentions: tuple[str, str]) -> dict:
    """A corpus record; each (surface, entity id) is located after the previous mention."""
    spans, cursor = [], 0
    for surface, entity_id in mentions:
        start = text.index(surface, cursor)
        spans.append({"char_start": start, "char_end": start + len(surface), "entity_id": entity_id})
        cursor = start + len(surface)
    return {"text": text, "mentions": spans}


CORPUS = [
    record("Barack Obama was born in Honolulu .", ("Barack Obama", "Q76"), ("Honolulu", "Q18094")),
    record("Honolulu is a city in Hawaii .", ("Honolulu", "Q18094"), ("Hawaii", "Q782")),
    record("Paris is the capital of France .", ("Paris", "Q90"), ("France", "Q142")),
    record("Obama visited Paris in the spring .", ("Obama", "Q76"), ("Paris", "Q90")),
    record("The Louvre is a museum in Paris .", ("Louvre", "Q19675"), ("Paris", "Q90")),
    record("Paris hosted the games .", ("Paris", "Q90")),
    record("Many tourists love Paris and Honolulu .", ("Paris", "Q90"), ("Honolulu", "Q18094")),
    record("France borders Spain .", ("France", "Q142"), ("Spain", "Q29")),
    record("Barack Obama met the president of France in Paris .", ("Barack Obama", "Q76"), ("France", "Q142"),
           ("Paris", "Q90")),
    record("The museum is not in Spain .", ("Spain", "Q29")),
]  # fmt: skip
NEW_CORPUS = [
    record("Madrid is the capital of Spain .", ("Madrid", "Q2807"), ("Spain", "Q29")),
    record("Lyon is a city in France .", ("Lyon", "Q456"), ("France", "Q142")),
    record("Madrid hosted the games .", ("Madrid", "Q2807")),
]
NAMES = {"Q76": "Barack Obama", "Q90": "Paris", "Q18094": "Honolulu", "Q999": "Nowhere"}
ALIASES = {"Q76": ["Obama", "President Obama"], "Q90": ["City of Light"]}
WORDS = sorted(
    {w for r in CORPUS + NEW_CORPUS for w in r["text"].lower().split()} - {"honolulu"}
    | {"hon", "##olulu", "long", "filler", "words"}
)


def bert_tokenizer(folder: Path) -> BertTokenizer:
    """A WordPiece vocabulary where "Honolulu" is two subwords (hon ##olulu)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def tiny_bert(vocab_size: int, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertForMaskedLM(config).eval()


def roberta_tokenizer(lstrip: bool) -> RobertaTokenizer:
    bpe = ByteLevelBPETokenizer()
    texts = [r["text"] for r in CORPUS + NEW_CORPUS]
    bpe.train_from_iterator(texts * 3, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    merges = [tuple(m) for m in json.loads(bpe._tokenizer.to_str())["model"]["merges"]]
    mask = AddedToken("<mask>", lstrip=lstrip, rstrip=False, special=True, normalized=False)
    return RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges, mask_token=mask)


def tiny_roberta(vocab_size: int, seed: int = 0) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
    )
    return RobertaForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tokenizer = bert_tokenizer(tmp_path_factory.mktemp("pelt-bert-vocab"))
    return tiny_bert(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def bert_table(bert) -> EntityLookupTable:
    model, tokenizer = bert
    return build_entity_table(model, tokenizer, CORPUS, batch_size=4, progress=False)


def hand_sum(model, tokenizer, entity_id: str, corpus=CORPUS) -> tuple[torch.Tensor, int]:
    """PELT by hand: the tokenizer on the masked string, one forward per occurrence, the head's transform, summed."""
    total, count = torch.zeros(model.config.hidden_size), 0
    for rec in corpus:
        for m in rec["mentions"]:
            if m["entity_id"] != entity_id:
                continue
            text = rec["text"][: m["char_start"]] + tokenizer.mask_token + rec["text"][m["char_end"] :]
            inputs = tokenizer(text, return_tensors="pt")
            position = int((inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
            with torch.no_grad():
                state = model.base_model(**inputs).last_hidden_state[0, position]
                if isinstance(model, BertForMaskedLM):
                    vector = model.cls.predictions.transform(state)
                else:  # RoBERTa: dense -> gelu -> layer norm
                    head = model.lm_head
                    vector = head.layer_norm(torch.nn.functional.gelu(head.dense(state)))
            total += vector
            count += 1
    return total, count


# ---------------------------------------------------------------------------------------------------------------
# The vectors
# ---------------------------------------------------------------------------------------------------------------
def test_entity_vector_matches_a_hand_computation_bert(bert, bert_table):
    model, tokenizer = bert
    for entity_id in ("Q76", "Q18094"):  # "Barack Obama" / "Obama"; "Honolulu" is two subwords
        expected, count = hand_sum(model, tokenizer, entity_id)
        row = bert_table.index(entity_id)
        assert int(bert_table.counts[row]) == count
        assert torch.allclose(bert_table.sums[row], expected, atol=1e-5)
        vector = bert_table.vectors([row])[0]
        assert torch.allclose(vector, expected / expected.norm() * 7.0, atol=1e-5)
        assert vector.norm().item() == pytest.approx(7.0, rel=1e-5)


@pytest.mark.parametrize("lstrip", [True, False], ids=["mask-lstrip", "mask-plain"])
def test_entity_vector_matches_a_hand_computation_roberta(lstrip):
    tokenizer = roberta_tokenizer(lstrip)
    model = tiny_roberta(len(tokenizer))
    table = build_entity_table(model, tokenizer, CORPUS, batch_size=3, progress=False)
    assert table.metadata["transform"] == "roberta" and table.metadata["model_type"] == "roberta"
    expected, count = hand_sum(model, tokenizer, "Q76")
    row = table.index("Q76")
    assert int(table.counts[row]) == count == 3
    assert torch.allclose(table.sums[row], expected, atol=1e-5)
    assert torch.allclose(table.vectors([row], norm=3.0)[0], expected / expected.norm() * 3.0, atol=1e-5)


def test_table_rows_metadata_names_and_aliases(bert, bert_table):
    model, _ = bert
    table = bert_table
    assert table.entity_ids == ["Q76", "Q18094", "Q782", "Q90", "Q142", "Q19675", "Q29"]  # order of first mention
    assert table.counts.tolist() == [3, 3, 1, 6, 3, 1, 2]
    meta = table.metadata
    assert meta["model_fingerprint"] == hk.base_fingerprint(model.bert)
    assert meta["hidden_size"] == 32 and meta["model_type"] == "bert" and meta["transform"] == "bert"
    assert meta["max_occurrences"] == 256 and meta["seed"] == 0 and meta["num_occurrences"] == 19
    assert meta["num_records"] == len(CORPUS)
    named = build_entity_table(
        model, bert[1], CORPUS, entity_names=NAMES, entity_aliases=ALIASES, mention_aliases=True, progress=False
    )
    assert named.names[named.index("Q76")] == "Barack Obama" and named.names[named.index("Q29")] is None
    assert named.aliases[named.index("Q76")] == ["Obama", "President Obama"]  # given ones, then new mention strings
    assert named.aliases[named.index("Q29")] == ["Spain"]
    assert "Q999" not in named  # named but never mentioned: no row
    assert torch.allclose(named.sums, table.sums, atol=1e-5)  # (other batch size: other padding)


def test_batches_mix_entities_instead_of_one_forward_per_entity(bert):
    model, tokenizer = bert
    batches: list[int] = []
    build_entity_table(model, tokenizer, CORPUS, batch_size=8, progress=False, _on_batch=batches.append)
    assert batches == [8, 8, 3]  # 19 occurrences of 7 entities in 3 forwards


def test_model_mode_is_restored_and_grad_free(bert):
    model, tokenizer = bert
    model.train()
    try:
        table = build_entity_table(model, tokenizer, CORPUS[:2], progress=False)
    finally:
        model.eval()
    assert model.training is False
    assert not table.sums.requires_grad and not table.sums.is_inference()


# ---------------------------------------------------------------------------------------------------------------
# Masking and windows
# ---------------------------------------------------------------------------------------------------------------
def test_the_whole_multi_subword_mention_becomes_exactly_one_mask(bert):
    _, tokenizer = bert
    encoder = _MaskedEncoder(tokenizer, max_length=64)
    rec = CORPUS[0]  # Barack Obama was born in Honolulu .
    honolulu = rec["mentions"][1]
    assert tokenizer.tokenize("Honolulu") == ["hon", "##olulu"]
    ids, positions, windowed = encoder.encode([rec["text"]], [honolulu["char_start"]], [honolulu["char_end"]])
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens == ["[CLS]", "barack", "obama", "was", "born", "in", "[MASK]", ".", "[SEP]"]
    assert positions == [6] and windowed == 0
    obama = rec["mentions"][0]  # the other mention stays text
    ids, positions, _ = encoder.encode([rec["text"]], [obama["char_start"]], [obama["char_end"]])
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["[CLS]", "[MASK]", "was", "born", "in", "hon", "##olulu", ".", "[SEP]"]  # fmt: skip
    assert positions == [1]


def test_roberta_mask_takes_the_space_before_it_when_the_tokenizer_does():
    for lstrip in (True, False):
        tokenizer = roberta_tokenizer(lstrip)
        encoder = _MaskedEncoder(tokenizer, max_length=64)
        text = CORPUS[3]["text"]  # Obama visited Paris in the spring .
        start = text.index("Paris")
        ids, positions, _ = encoder.encode([text], [start], [start + 5])
        expected = tokenizer(text[:start] + "<mask>" + text[start + 5 :])["input_ids"]
        assert ids[0] == expected and ids[0].count(tokenizer.mask_token_id) == 1
        assert ids[0][positions[0]] == tokenizer.mask_token_id


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_long_texts_keep_a_window_around_the_mask(bert, where):
    _, tokenizer = bert
    words = [("long", "words", "the", "filler")[i % 4] for i in range(300)]
    words[{"start": 0, "middle": 150, "end": 299}[where]] = "Paris"
    text = " ".join(words)
    start = text.index("Paris")
    encoder = _MaskedEncoder(tokenizer, max_length=16)
    ids, positions, windowed = encoder.encode([text], [start], [start + 5])
    assert len(ids[0]) == 16 and windowed == 1
    assert ids[0].count(tokenizer.mask_token_id) == 1 and ids[0][positions[0]] == tokenizer.mask_token_id
    full = tokenizer(text[:start] + "[MASK]" + text[start + 5 :], add_special_tokens=False)["input_ids"]
    at = full.index(tokenizer.mask_token_id)
    left = positions[0] - 1
    right = 16 - 2 - 1 - left
    assert ids[0][1:-1] == full[at - left : at + 1 + right]  # exactly the full tokenization's neighbours
    if where == "middle":
        assert (left, right) == (6, 7)
    elif where == "start":
        assert positions[0] == 1
    else:
        assert ids[0][-2] == tokenizer.mask_token_id


def test_very_long_texts_are_cut_before_tokenizing_but_the_window_is_unchanged(bert):
    _, tokenizer = bert
    text = "long " * 5000 + "Paris" + " words" * 5000
    start = text.index("Paris")
    encoder = _MaskedEncoder(tokenizer, max_length=12)
    ids, positions, _ = encoder.encode([text], [start], [start + 5])
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["[CLS]"] + ["long"] * 4 + ["[MASK]"] + ["words"] * 5 + ["[SEP]"]


def test_build_uses_the_window(bert):
    model, tokenizer = bert
    long_text = " ".join(["long"] * 200) + " Paris " + " ".join(["words"] * 200)
    corpus = [record(long_text, ("Paris", "Q90"))]
    table = build_entity_table(model, tokenizer, corpus, max_length=20, progress=False)
    assert table.metadata["windowed_occurrences"] == 1
    inputs = tokenizer(" ".join(["long"] * 8) + " [MASK] " + " ".join(["words"] * 9), return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 20
    with torch.no_grad():
        state = model.bert(**inputs).last_hidden_state[0, 9]
        expected = model.cls.predictions.transform(state)
    assert torch.allclose(table.sums[0], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
def test_sampling_caps_at_k_and_is_seeded(bert, bert_table):
    picked = sample_occurrences(50, 8, seed=3, entity_id="Q90")
    assert len(picked) == 8 and len(set(picked.tolist())) == 8 and picked.tolist() == sorted(picked.tolist())
    assert picked.tolist() == sample_occurrences(50, 8, seed=3, entity_id="Q90").tolist()
    assert picked.tolist() != sample_occurrences(50, 8, seed=4, entity_id="Q90").tolist()
    assert picked.tolist() != sample_occurrences(50, 8, seed=3, entity_id="Q91").tolist()
    assert sample_occurrences(5, 8, seed=3, entity_id="Q90").tolist() == [0, 1, 2, 3, 4]

    model, tokenizer = bert
    capped = build_entity_table(model, tokenizer, CORPUS, max_occurrences=2, seed=1, progress=False)
    assert capped.counts.max() == 2 and capped.counts[capped.index("Q90")] == 2
    assert capped.metadata["num_mentions"] == 19 and capped.metadata["max_occurrences"] == 2
    again = build_entity_table(model, tokenizer, CORPUS, max_occurrences=2, seed=1, progress=False)
    assert torch.equal(again.sums, capped.sums)
    # Entities with at most K mentions use all of them: same rows as the uncapped table.
    for entity_id in ("Q782", "Q19675", "Q29"):
        assert torch.allclose(capped.sums[capped.index(entity_id)], bert_table.sums[bert_table.index(entity_id)])
    # The capped entity's 2 occurrences are those sample_occurrences picks among its 6 mentions.
    mentions = [(r, m) for r in CORPUS for m in r["mentions"] if m["entity_id"] == "Q90"]
    chosen = [mentions[i] for i in sample_occurrences(6, 2, seed=1, entity_id="Q90")]
    expected, _ = hand_sum(model, tokenizer, "Q90", [{"text": r["text"], "mentions": [m]} for r, m in chosen])
    assert torch.allclose(capped.sums[capped.index("Q90")], expected, atol=1e-5)
    others = [build_entity_table(model, tokenizer, CORPUS, max_occurrences=2, seed=s, progress=False) for s in (2, 3)]
    assert any(not torch.equal(o.sums[o.index("Q90")], capped.sums[capped.index("Q90")]) for o in others)


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_an_interrupted_build_resumes_without_recomputing(bert, tmp_path):
    model, tokenizer = bert
    settings = dict(batch_size=2, chunk_size=4, progress=False)
    reference = build_entity_table(model, tokenizer, CORPUS, **settings)
    out = tmp_path / "table"

    def stop_after(n: int):
        seen = []

        def callback(size: int) -> None:
            seen.append(size)
            if len(seen) == n:
                raise Interrupt

        return callback

    with pytest.raises(Interrupt):  # 5 batches of 2: chunks 0 and 1 (4 occurrences each) finish, chunk 2 does not
        build_entity_table(model, tokenizer, CORPUS, output_dir=out, _on_batch=stop_after(5), **settings)
    finished = sorted(p.name for p in (out / "partial").glob("chunk-*.safetensors"))
    assert finished == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert not (out / "entity_table_config.json").exists()

    with pytest.raises(ValueError, match="max_length"):  # another plan cannot resume this one
        build_entity_table(model, tokenizer, CORPUS, output_dir=out, max_length=64, **settings)

    computed: list[int] = []
    resumed = build_entity_table(model, tokenizer, CORPUS, output_dir=out, _on_batch=computed.append, **settings)
    assert sum(computed) == 19 - 8  # the 8 finished occurrences were read back, not recomputed
    assert resumed.entity_ids == reference.entity_ids and torch.equal(resumed.counts, reference.counts)
    assert torch.allclose(resumed.sums, reference.sums, atol=1e-6, rtol=0)
    assert not (out / "partial").exists()
    assert torch.equal(EntityLookupTable.from_pretrained(out).sums, resumed.sums)

    computed.clear()  # a finished build is loaded, not recomputed
    again = build_entity_table(model, tokenizer, CORPUS, output_dir=out, _on_batch=computed.append, **settings)
    assert computed == [] and torch.equal(again.sums, resumed.sums)
    labelled = build_entity_table(  # new labels or norm: applied and saved, still nothing recomputed
        model, tokenizer, CORPUS, output_dir=out, entity_names=NAMES, norm=5.0, _on_batch=computed.append, **settings
    )
    assert computed == [] and labelled.names[0] == "Barack Obama" and labelled.norm == 5.0
    reloaded = EntityLookupTable.from_pretrained(out)
    assert reloaded.names == labelled.names and reloaded.norm == 5.0 and torch.equal(reloaded.sums, resumed.sums)
    with pytest.raises(ValueError, match="other settings"):
        build_entity_table(model, tokenizer, CORPUS, output_dir=out, seed=5, max_occurrences=2, **settings)


def test_a_damaged_chunk_file_is_recomputed(bert, tmp_path):
    model, tokenizer = bert
    settings = dict(batch_size=2, chunk_size=4, progress=False)
    out = tmp_path / "table"
    calls = []

    def stop(size: int) -> None:
        calls.append(size)
        if len(calls) == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_entity_table(model, tokenizer, CORPUS, output_dir=out, _on_batch=stop, **settings)
    (out / "partial" / "chunk-000001.safetensors").write_bytes(b"garbage")
    computed: list[int] = []
    table = build_entity_table(model, tokenizer, CORPUS, output_dir=out, _on_batch=computed.append, **settings)
    assert sum(computed) == 19 - 4
    reference = build_entity_table(model, tokenizer, CORPUS, **settings)
    assert torch.allclose(table.sums, reference.sums, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------
class FakeAccelerator:
    """Simulates one of two processes: `reduce` adds what the other process contributed (recorded beforehand)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, rank: int, partner: list[torch.Tensor] | None = None):
        self.process_index = rank
        self.is_main_process = rank == 0
        self.partner = partner
        self.reduced: list[torch.Tensor] = []
        self.waits = 0

    def wait_for_everyone(self) -> None:
        self.waits += 1

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        self.reduced.append(tensor.clone())
        return tensor if self.partner is None else tensor + self.partner[len(self.reduced) - 1]


def test_processes_take_strided_chunks_and_sums_are_reduced(bert, tmp_path):
    model, tokenizer = bert
    settings = dict(batch_size=2, chunk_size=3, progress=False)
    single = build_entity_table(model, tokenizer, CORPUS, **settings)
    second = FakeAccelerator(1)
    seen_1: list[int] = []
    with pytest.raises(RuntimeError, match="chunks were lost"):  # alone, its share does not add up to the plan
        build_entity_table(model, tokenizer, CORPUS, accelerator=second, _on_batch=seen_1.append, **settings)
    first = FakeAccelerator(0, partner=second.reduced)
    seen_0: list[int] = []
    table = build_entity_table(model, tokenizer, CORPUS, accelerator=first, _on_batch=seen_0.append, **settings)
    # 19 occurrences in 7 chunks of 3: process 0 takes chunks 0, 2, 4, 6 (10 occurrences), process 1 the rest.
    assert sum(seen_0) == 10 and sum(seen_1) == 9
    assert torch.equal(table.counts, single.counts)
    assert torch.allclose(table.sums, single.sums, atol=1e-6, rtol=0)
    assert second.reduced[1].sum() == 9  # counts of process 1's share alone


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_accelerate_match_one(bert, tmp_path):
    model, tokenizer = bert
    model_dir, corpus_file, out = tmp_path / "mlm", tmp_path / "corpus.jsonl", tmp_path / "table"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus_file.write_text("\n".join(json.dumps(r) for r in CORPUS) + "\n")
    script = tmp_path / "build.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch
            from accelerate import Accelerator
            from transformers import AutoModelForMaskedLM, AutoTokenizer
            from hf_kadapter.pelt.build import build_entity_table

            torch.set_num_threads(1)
            accelerator = Accelerator(cpu=True)
            model = AutoModelForMaskedLM.from_pretrained({str(model_dir)!r}).eval()
            tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r})
            table = build_entity_table(model, tokenizer, {str(corpus_file)!r}, batch_size=2, chunk_size=3,
                                       output_dir={str(out)!r}, accelerator=accelerator, progress=False)
            print(f"RANK {{accelerator.process_index}} COUNTS {{table.counts.tolist()}}")
            """
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = build_entity_table(model, tokenizer, str(corpus_file), batch_size=2, chunk_size=3, progress=False)
    expected = f"COUNTS {single.counts.tolist()}"
    assert f"RANK 0 {expected}" in result.stdout and f"RANK 1 {expected}" in result.stdout
    saved = EntityLookupTable.from_pretrained(out)
    assert saved.entity_ids == single.entity_ids and torch.equal(saved.counts, single.counts)
    assert torch.allclose(saved.sums, single.sums, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Models: K-Adapter, unsupported ones
# ---------------------------------------------------------------------------------------------------------------
def test_a_table_from_the_bases_masked_lm_works_with_kadapter_models(bert, bert_table, tmp_path):
    model, tokenizer = bert
    folder = tmp_path / "mlm"
    model.save_pretrained(folder)
    adapter = hk.KnowledgeAdapterConfig(tap_layers=[0, 2], hidden_size=16, num_attention_heads=2, intermediate_size=32)
    kadapter = hk.KAdapterModel.from_base(str(folder), adapters={"factual": adapter})
    bert_table.check_model(kadapter)
    head = hk.KAdapterForSequenceClassification.from_base(str(folder), adapters={"factual": adapter}, num_labels=2)
    bert_table.check_model(head)
    saved = tmp_path / "kadapter"
    kadapter.save_pretrained(saved)
    bert_table.check_model(hk.KAdapterModel.from_pretrained(saved))

    other = hk.KAdapterModel.from_base(tiny_bert(len(tokenizer), seed=1), adapters={"factual": adapter})
    with pytest.raises(EntityTableMismatchError, match="KAdapterModel"):
        bert_table.check_model(other)
    with pytest.raises(TypeError, match="masked LM of its base"):
        build_entity_table(kadapter, tokenizer, CORPUS, progress=False)


def test_models_without_a_masked_lm_head_are_refused(bert):
    _, tokenizer = bert
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64))  # fmt: skip
    with pytest.raises(TypeError, match="no masked-LM head transform.*AutoModelForMaskedLM"):
        lm_head_transform(encoder, torch.zeros(1, 32))
    with pytest.raises(TypeError, match="BertModel"):
        build_entity_table(encoder, tokenizer, CORPUS, progress=False)


def test_lm_head_transform_is_the_head_without_the_decoder(bert):
    model, tokenizer = bert
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(lm_head_transform(model, hidden), model.cls.predictions.transform(hidden))
        assert torch.allclose(model.cls.predictions.decoder(lm_head_transform(model, hidden)), model.cls(hidden))
        roberta = tiny_roberta(50)
        assert torch.allclose(roberta.lm_head.decoder(lm_head_transform(roberta, hidden)), roberta.lm_head(hidden))


def test_tokenizer_and_model_must_belong_together(bert):
    _, tokenizer = bert
    with pytest.raises(ValueError, match="do not belong together"):
        build_entity_table(tiny_bert(10), tokenizer, CORPUS, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# New domains
# ---------------------------------------------------------------------------------------------------------------
def test_adding_a_new_corpus_leaves_the_old_rows_bit_identical(bert, bert_table):
    model, tokenizer = bert
    table = bert_table.copy()
    before = table.sums.clone()
    new = build_entity_table(model, tokenizer, NEW_CORPUS, skip_entities=table, progress=False)
    assert new.entity_ids == ["Q2807", "Q456"]  # Spain and France are known: not computed at all
    assert new.metadata["num_occurrences"] == 3
    added = table.add_entities(new)
    assert added == ["Q2807", "Q456"]
    assert torch.equal(table.sums[: len(before)], before)  # bit-identical
    assert table.entity_ids[: len(before)] == bert_table.entity_ids
    assert torch.equal(table.vectors([table.index("Q2807")]), new.vectors([0]))
    expected, _ = hand_sum(model, tokenizer, "Q2807", NEW_CORPUS)
    assert torch.allclose(table.sums[table.index("Q2807")], expected, atol=1e-5)

    # Without skipping, shared entities are summed (as if the corpora were one) unless on_duplicate="keep".
    full = build_entity_table(model, tokenizer, NEW_CORPUS, progress=False)
    summed = bert_table.merge(full)
    spain = bert_table.index("Q29")
    assert summed.counts[spain] == 3
    assert torch.allclose(summed.sums[spain], bert_table.sums[spain] + full.sums[full.index("Q29")])
    both = build_entity_table(model, tokenizer, CORPUS + NEW_CORPUS, progress=False)
    assert torch.allclose(summed.sums[spain], both.sums[both.index("Q29")], atol=1e-5)
    kept = bert_table.merge(full, on_duplicate="keep")
    assert torch.equal(kept.sums[: len(before)], before)

    other_model = tiny_bert(len(tokenizer), seed=7)
    foreign = build_entity_table(other_model, tokenizer, NEW_CORPUS, progress=False)
    with pytest.raises(EntityTableMismatchError, match="same model"):
        table.add_entities(foreign)


# ---------------------------------------------------------------------------------------------------------------
# Corpus validation
# ---------------------------------------------------------------------------------------------------------------
def _write(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, field, why",
    [
        ({"text": "Paris is nice .", "mentions": [{"char_start": 0, "char_end": 40, "entity_id": "Q90"}]},
         "mentions[0].char_end", "outside"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": 3, "char_end": 3, "entity_id": "Q90"}]},
         "mentions[0].char_end", "outside"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": -1, "char_end": 3, "entity_id": "Q90"}]},
         "mentions[0].char_start", "outside"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": 5, "char_end": 6, "entity_id": "Q90"}]},
         "mentions[0]", "whitespace"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": 0, "char_end": 5}]},
         "mentions[0].entity_id", "missing"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": 0, "char_end": 5, "entity_id": 90}]},
         "mentions[0].entity_id", "expected str"),
        ({"text": "Paris is nice .", "mentions": [{"char_start": "0", "char_end": 5, "entity_id": "Q90"}]},
         "mentions[0].char_start", "expected int"),
        ({"text": "", "mentions": []}, "text", "empty"),
        ({"mentions": []}, "text", "missing"),
        ({"text": "Paris is nice .", "mentions": "Q90"}, "mentions", "expected list"),
    ],
)  # fmt: skip
def test_corpus_errors_name_the_file_line_and_field(tmp_path, bad, field, why):
    path = _write(tmp_path / "corpus.jsonl", [CORPUS[0], CORPUS[1], bad, CORPUS[2]])
    with pytest.raises(DataFormatError) as caught:
        load_entity_corpus(path)
    message = str(caught.value)
    assert str(path) in message and "line 3" in message and f"field {field!r}" in message and why in message
    report = DataReport()
    kept = load_entity_corpus(path, on_error="skip", report=report)
    assert len(kept) == 3 and report.skipped == 1 and report.read == 4


def test_in_memory_corpora_are_validated_by_row(tmp_path):
    bad = {"text": "Paris .", "mentions": [{"char_start": 0, "char_end": 9, "entity_id": "Q90"}]}
    with pytest.raises(DataFormatError, match=r"corpus row 1, field 'mentions\[0\].char_end'"):
        load_entity_corpus([CORPUS[0], bad])
    dataset = datasets.Dataset.from_list(CORPUS + [bad])
    with pytest.raises(DataFormatError, match=f"corpus row {len(CORPUS)}"):
        load_entity_corpus(dataset)
    loaded = load_entity_corpus(dataset, on_error="skip")
    assert len(loaded) == len(CORPUS) and loaded[0] == CORPUS[0]
    json_array = tmp_path / "corpus.json"
    json_array.write_text(json.dumps(CORPUS, indent=1))
    assert load_entity_corpus(json_array)["text"] == [r["text"] for r in CORPUS]


def test_build_reads_files_datasets_and_lists_alike(bert, bert_table, tmp_path):
    model, tokenizer = bert
    path = _write(tmp_path / "corpus.jsonl", CORPUS)
    for corpus in (str(path), datasets.Dataset.from_list(CORPUS), load_entity_corpus(path)):
        table = build_entity_table(model, tokenizer, corpus, batch_size=4, progress=False)
        assert torch.equal(table.sums, bert_table.sums)
    with pytest.raises(ValueError, match="no entity mentions"):
        build_entity_table(model, tokenizer, [{"text": "Paris .", "mentions": []}], progress=False)
