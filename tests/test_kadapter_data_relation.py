"""Relation / entity data: loading with located errors, label vocabularies, marker preprocessing with BERT
WordPiece and RoBERTa byte-level BPE tokenizers, the collator, and one batch through the factual head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, tiny_adapter
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertTokenizer, RobertaTokenizer

import hf_kadapter as hk
from hf_kadapter.kadapter.data.collator import KAdapterDataCollator
from hf_kadapter.kadapter.data.records import DataFormatError, DataReport
from hf_kadapter.kadapter.data.relation import (
    PreprocessingError,
    build_label_vocab,
    load_entity_typing,
    load_factual,
    load_relation,
    prepare_word_tokenizer,
    preprocess_entity_typing,
    preprocess_factual,
    preprocess_relation,
)

FIXTURES = Path(__file__).parent / "fixtures"

BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "@",
    "#",
    ".",
    "'",
    "bar",
    "##ack",
    "obama",
    "was",
    "born",
    "in",
    "hon",
    "##olu",
    "##lu",
    "is",
    "a",
    "city",
    "hawaii",
    "paris",
    "the",
    "capital",
    "of",
    "france",
    "citizen",
    "united",
    "states",
    "he",
    "met",
    "s",
    "wife",
    "1961",
]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
ROBERTA_PIECES = ["Ġ@", "Ġ#", "ĠBar", "ack", "ĠObama", "ĠHon", "olulu", "Ġwas", "Ġborn", "Ġin", "Ġ."]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory) -> BertTokenizer:
    path = tmp_path_factory.mktemp("bert-tok") / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return BertTokenizer(vocab=str(path))


@pytest.fixture(scope="module")
def roberta_tokenizer(tmp_path_factory) -> RobertaTokenizer:
    """A byte-level BPE with hand-written merges (so the expected subwords are exact), left at the default
    add_prefix_space=False, as RoBERTa checkpoints ship."""
    folder = tmp_path_factory.mktemp("roberta-tok")
    vocab = {token: i for i, token in enumerate(ROBERTA_SPECIALS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    merges = []
    for piece in ROBERTA_PIECES:
        current = piece[0]
        for char in piece[1:]:
            merges.append(f"{current} {char}")
            current += char
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def tokens(tokenizer, row) -> list[str]:
    return tokenizer.convert_ids_to_tokens(row["input_ids"])


# ----- loading ---------------------------------------------------------------------------------------------------
def test_load_factual_keeps_official_fields():
    data = load_factual(FIXTURES / "trex_train.json")
    assert len(data) == 6
    assert set(data.column_names) == {
        "id", "docid", "token", "subj_start", "subj_end", "obj_start", "obj_end", "relation", "subj_label", "obj_label"
    }  # fmt: skip
    first = data[0]
    assert first["token"][:2] == ["Barack", "Obama"] and first["relation"] == "P19"
    assert (first["subj_start"], first["subj_end"], first["obj_start"], first["obj_end"]) == (0, 1, 5, 5)


@pytest.mark.parametrize(
    ("name", "loader", "line", "field", "phrase"),
    [
        ("trex_bad_span.jsonl", load_factual, 2, "obj_end", "outside"),
        ("trex_bad_type.jsonl", load_factual, 2, "token", "expected list, got str"),
        ("trex_bad_empty.jsonl", load_factual, 2, "token", "empty text"),
        ("trex_bad_overlap.jsonl", load_factual, 2, "obj_start", "overlaps the subject span"),
        ("openentity_bad_empty.jsonl", load_entity_typing, 2, "sent", "empty text"),
        ("openentity_bad_span.jsonl", load_entity_typing, 3, "end", "outside"),
        ("openentity_bad_labels.jsonl", load_entity_typing, 2, "labels", "expected list, got str"),
    ],
)
def test_load_error_names_file_line_field(name, loader, line, field, phrase):
    with pytest.raises(DataFormatError) as caught:
        loader(FIXTURES / name)
    message = str(caught.value)
    assert name in message and f"line {line}," in message and f"field {field!r}" in message and phrase in message
    assert (caught.value.line, caught.value.field) == (line, field)


def test_unknown_label_names_file_line_field():
    label2id = {"no_relation": 0, "per:city_of_birth": 1, "per:countries_of_residence": 2}
    with pytest.raises(DataFormatError, match=r"tacred_bad_label\.jsonl, line 3, field 'relation': unknown label"):
        load_relation(FIXTURES / "tacred_bad_label.jsonl", label2id=label2id)
    types = {"entity": 0, "person": 1, "location": 2, "place": 3}  # no "organization" (record 3, line 4)
    with pytest.raises(DataFormatError, match=r"openentity_train\.json, line 4, field 'labels': unknown label"):
        load_entity_typing(FIXTURES / "openentity_train.json", label2id=types)


def test_skip_mode_counts():
    report = DataReport()
    data = load_factual(FIXTURES / "trex_bad_mixed.jsonl", on_error="skip", report=report)
    assert len(data) == 4
    assert (report.read, report.kept, report.skipped) == (7, 4, 3)
    fields = sorted(reason.split(":")[0] for reason in report.reasons)
    assert fields == ["obj_end", "relation", "token"]


def test_entity_typing_char_span_to_words():
    report = DataReport()
    data = load_entity_typing(FIXTURES / "openentity_train.json", report=report)
    assert len(data) == 6
    first = data[0]
    assert first["token"] == ["Barack", "Obama", "was", "born", "in", "Honolulu", "."]
    assert (first["ent_start"], first["ent_end"]) == (0, 1) and first["labels"] == ["person", "entity"]
    assert (first["sent"], first["start"], first["end"]) == ("Barack Obama was born in Honolulu .", 0, 12)
    # "Obama's" with the span on "Obama": split at the boundary, and noted.
    split = data[3]
    assert split["token"][2:4] == ["Obama", "'s"] and (split["ent_start"], split["ent_end"]) == (2, 2)
    assert report.notes == {"entity spans splitting a word (split there)": 1}
    multi = data[4]
    assert multi["token"][multi["ent_start"] : multi["ent_end"] + 1] == ["the", "United", "States"]


def test_ids_survive_loading_and_skipping_preprocessing(tmp_path, bert_tokenizer):
    """on_error='skip' drops examples: the kept rows' ids say which (the loaders used to drop the id field)."""
    far = "and more words " * 10 + "Alice ."
    records = [
        {"id": "r0", "sent": "Alice met Bob .", "start": 0, "end": 5, "labels": ["person"]},
        {"id": "r1", "sent": far, "start": far.index("Alice"), "end": far.index("Alice") + 5, "labels": ["person"]},
        {"id": "r2", "sent": "Alice left .", "start": 0, "end": 5, "labels": ["person"]},
    ]
    path = tmp_path / "typing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_entity_typing(path)
    assert loaded["id"] == ["r0", "r1", "r2"]
    report = DataReport()
    data = preprocess_entity_typing(
        loaded, bert_tokenizer, {"person": 0}, max_length=16, on_error="skip", report=report
    )
    assert report.skipped == 1 and data["id"] == ["r0", "r2"]


def test_no_relation_subsampling_is_seeded_and_counted():
    full = load_relation(FIXTURES / "tacred_train.json")
    assert full["relation"].count("no_relation") == 5 and full[0]["id"] == "t01" and full[0]["subj_type"] == "PERSON"
    picks = []
    for _ in range(2):
        report = DataReport()
        data = load_relation(FIXTURES / "tacred_train.json", no_relation_keep=0.4, seed=3, report=report)
        picks.append(data["id"])
        assert data["relation"].count("no_relation") == 2 and len(data) == 5
        assert sum(report.notes.values()) == 3 and "no_relation dropped by subsampling" in next(iter(report.notes))
    assert picks[0] == picks[1]
    assert picks[0] == sorted(picks[0])  # original order kept
    assert {"t01", "t04", "t08"} <= set(picks[0])  # positives never dropped
    selections = {
        tuple(load_relation(FIXTURES / "tacred_train.json", no_relation_keep=0.4, seed=s)["id"]) for s in range(6)
    }
    assert len(selections) > 1
    assert len(load_relation(FIXTURES / "tacred_train.json", no_relation_keep=0.0)) == 3
    with pytest.raises(ValueError, match="fraction"):
        load_relation(FIXTURES / "tacred_train.json", no_relation_keep=1.5)


def test_label_vocab_sorted_and_flattened():
    trex = load_factual(FIXTURES / "trex_train.json")
    assert build_label_vocab(trex) == {"P131": 0, "P1376": 1, "P17": 2, "P19": 3, "P27": 4}
    entities = load_entity_typing(FIXTURES / "openentity_train.json")
    vocab = build_label_vocab(entities, field="labels")
    assert list(vocab) == sorted(vocab) == ["entity", "group", "location", "organization", "person", "place", "time"]
    assert list(vocab.values()) == list(range(7))
    tacred = load_relation(FIXTURES / "tacred_train.json")
    both = build_label_vocab(trex, tacred)
    assert both == build_label_vocab(tacred, trex) and "no_relation" in both and "P19" in both
    with pytest.raises(ValueError, match="not a column"):
        build_label_vocab(trex, field="labels")


# ----- preprocessing ---------------------------------------------------------------------------------------------
def test_factual_bert_tokens_and_positions(bert_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    label2id = build_label_vocab(trex)
    data = preprocess_factual(trex, bert_tokenizer, label2id)
    assert data.column_names == [
        "input_ids", "token_type_ids", "attention_mask", "subject_positions", "object_positions", "labels", "id"
    ]  # fmt: skip
    first = data[0]
    # "Barack" -> bar ##ack inside the subject, "Honolulu" -> hon ##olu ##lu inside the object.
    assert tokens(bert_tokenizer, first) == (
        [
            "[CLS]",
            "@",
            "bar",
            "##ack",
            "obama",
            "@",
            "was",
            "born",
            "in",
            "#",
            "hon",
            "##olu",
            "##lu",
            "#",
            ".",
            "[SEP]",
        ]
    )
    assert (first["subject_positions"], first["object_positions"], first["labels"]) == (1, 9, label2id["P19"])
    # Object before subject: "The capital of # France # is @ Paris @ ."
    reverse = data[3]
    assert tokens(bert_tokenizer, reverse) == [
        "[CLS]",
        "the",
        "capital",
        "of",
        "#",
        "france",
        "#",
        "is",
        "@",
        "paris",
        "@",
        ".",
        "[SEP]",
    ]
    assert (reverse["subject_positions"], reverse["object_positions"]) == (8, 4)
    for row in data:
        ids = row["input_ids"]
        assert ids[row["subject_positions"]] == bert_tokenizer.convert_tokens_to_ids("@")
        assert ids[row["object_positions"]] == bert_tokenizer.convert_tokens_to_ids("#")


def test_factual_roberta_prefix_space_and_positions(roberta_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    data = preprocess_factual(trex, roberta_tokenizer, build_label_vocab(trex))
    assert "token_type_ids" not in data.column_names
    first = data[0]
    expected = [
        "<s>",
        "Ġ@",
        "ĠBar",
        "ack",
        "ĠObama",
        "Ġ@",
        "Ġwas",
        "Ġborn",
        "Ġin",
        "Ġ#",
        "ĠHon",
        "olulu",
        "Ġ#",
        "Ġ.",
        "</s>",
    ]
    assert tokens(roberta_tokenizer, first) == expected
    assert (first["subject_positions"], first["object_positions"]) == (1, 9)
    # The caller's tokenizer is untouched; the fix lives in a copy.
    assert roberta_tokenizer.add_prefix_space is False
    glued = roberta_tokenizer(["Barack", "Obama"], is_split_into_words=True)
    assert "ĠObama" not in roberta_tokenizer.convert_ids_to_tokens(glued["input_ids"])
    fixed = prepare_word_tokenizer(roberta_tokenizer)
    assert fixed is not roberta_tokenizer and prepare_word_tokenizer(fixed) is fixed


def test_relation_keeps_id_and_encodes_labels(bert_tokenizer, roberta_tokenizer):
    tacred = load_relation(FIXTURES / "tacred_train.json")
    label2id = build_label_vocab(tacred)
    for tokenizer, at in ((bert_tokenizer, "@"), (roberta_tokenizer, "Ġ@")):
        data = preprocess_relation(tacred, tokenizer, label2id)
        assert data["id"] == [f"t0{i}" for i in range(1, 9)]
        assert data["labels"] == [label2id[r] for r in tacred["relation"]]
        row = data[6]  # subject (Hawaii) after the object (Honolulu)
        assert tokens(tokenizer, row)[row["subject_positions"]] == at
        assert row["object_positions"] < row["subject_positions"]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_entity_typing_marker_and_multi_hot(kind, bert_tokenizer, roberta_tokenizer):
    tokenizer = bert_tokenizer if kind == "bert" else roberta_tokenizer
    entities = load_entity_typing(FIXTURES / "openentity_train.json")
    label2id = build_label_vocab(entities, field="labels")
    data = preprocess_entity_typing(entities, tokenizer, label2id)
    first = data[0]
    if kind == "bert":
        assert tokens(tokenizer, first) == [
            "[CLS]",
            "@",
            "bar",
            "##ack",
            "obama",
            "@",
            "was",
            "born",
            "in",
            "hon",
            "##olu",
            "##lu",
            ".",
            "[SEP]",
        ]
    else:
        assert tokens(tokenizer, first) == [
            "<s>",
            "Ġ@",
            "ĠBar",
            "ack",
            "ĠObama",
            "Ġ@",
            "Ġwas",
            "Ġborn",
            "Ġin",
            "ĠHon",
            "olulu",
            "Ġ.",
            "</s>",
        ]
    assert first["entity_positions"] == 1
    assert first["labels"] == [1.0 if name in ("person", "entity") else 0.0 for name in label2id]
    second = data[1]
    marker = "@" if kind == "bert" else "Ġ@"
    assert tokens(tokenizer, second)[second["entity_positions"]] == marker
    assert tokens(tokenizer, second)[second["entity_positions"] + 1] in ("hon", "ĠHon")


def test_truncation_raises_or_skips_never_wrong_position(bert_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    label2id = build_label_vocab(trex)
    # Example 0 needs 16 tokens; at 12 its object markers are cut, at 13 only the closing '#'.
    for max_length in (12, 13):
        with pytest.raises(PreprocessingError) as caught:
            preprocess_factual(trex.select([0]), bert_tokenizer, label2id, max_length=max_length)
        message = str(caught.value)
        assert "example 0" in message and "'#'" in message and "Raise max_length to at least 16" in message
        assert isinstance(caught.value, DataFormatError)
    report = DataReport()
    data = preprocess_factual(trex, bert_tokenizer, label2id, max_length=13, on_error="skip", report=report)
    full = preprocess_factual(trex, bert_tokenizer, label2id)
    fits = [i for i, row in enumerate(full) if len(row["input_ids"]) <= 13]
    assert len(data) == len(fits) and (report.read, report.kept, report.skipped) == (6, len(fits), 6 - len(fits))
    assert report.reasons == {"marker cut by truncation (max_length=13)": 6 - len(fits)}
    for row, i in zip(data, fits, strict=True):
        assert row["input_ids"] == full[i]["input_ids"]
        assert row["input_ids"][row["subject_positions"]] == bert_tokenizer.convert_tokens_to_ids("@")
    with pytest.raises(PreprocessingError, match="no example left"):
        preprocess_factual(trex, bert_tokenizer, label2id, max_length=4, on_error="skip")


def test_preprocess_unknown_label_raises_or_skips(bert_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    partial = {"P19": 0, "P131": 1, "P1376": 2}
    with pytest.raises(PreprocessingError, match=r"example 4, field 'relation': unknown label 'P27'"):
        preprocess_factual(trex, bert_tokenizer, partial)
    report = DataReport()
    data = preprocess_factual(trex, bert_tokenizer, partial, on_error="skip", report=report)
    assert len(data) == 4 and report.skipped == 2
    with pytest.raises(ValueError, match="0 .. num_labels - 1"):
        preprocess_factual(trex, bert_tokenizer, {"P19": 1})


def test_preprocess_is_deterministic(roberta_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    label2id = build_label_vocab(trex)
    first = preprocess_factual(trex, roberta_tokenizer, label2id, batch_size=2).to_list()
    assert first == preprocess_factual(trex, roberta_tokenizer, label2id, batch_size=1000).to_list()


# ----- collator --------------------------------------------------------------------------------------------------
def test_collator_pads_and_types(bert_tokenizer, roberta_tokenizer):
    tacred = load_relation(FIXTURES / "tacred_train.json")
    data = preprocess_relation(tacred, roberta_tokenizer, build_label_vocab(tacred))
    features = [data[0], data[2]]
    batch = KAdapterDataCollator(roberta_tokenizer, pad_to_multiple_of=8)(features)
    assert set(batch) == {"input_ids", "attention_mask", "subject_positions", "object_positions", "labels"}
    lengths = [len(f["input_ids"]) for f in features]
    padded = -(-max(lengths) // 8) * 8
    assert lengths[0] != lengths[1] and batch["input_ids"].shape == (2, padded)
    for i, length in enumerate(lengths):
        assert batch["input_ids"][i, :length].tolist() == features[i]["input_ids"]
        assert (batch["input_ids"][i, length:] == roberta_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (padded - length)
    assert all(batch[k].dtype == torch.long for k in batch)
    assert batch["labels"].shape == (2,)

    entities = load_entity_typing(FIXTURES / "openentity_train.json")
    typed = preprocess_entity_typing(entities, bert_tokenizer, build_label_vocab(entities, field="labels"))
    batch = KAdapterDataCollator(bert_tokenizer, label_kind="multi_hot")([typed[0], typed[5]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, 7)
    assert batch["token_type_ids"].dtype == torch.long and batch["entity_positions"].tolist() == [1, 5]
    assert batch["input_ids"][1, -1].item() == bert_tokenizer.pad_token_id


def test_collator_token_labels_multiple_choice_and_extra_columns(bert_tokenizer):
    collate = KAdapterDataCollator(bert_tokenizer, label_kind="token")
    batch = collate(
        [
            {"input_ids": [2, 5, 3], "labels": [-100, 2, -100], "id": "a", "words": ["x", "y"], "weight": 0.5},
            {"input_ids": [2, 5, 6, 7, 3], "labels": [-100, 0, 1, 1, -100], "id": "b", "words": [], "weight": 2.0},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "weight"}
    assert batch["labels"].tolist()[0] == [-100, 2, -100, -100, -100] and batch["labels"].dtype == torch.long
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [0.5, 2.0]
    assert batch["input_ids"][0].tolist() == [2, 5, 3, 0, 0]

    choices = KAdapterDataCollator(bert_tokenizer)(
        [
            {"input_ids": [[2, 5, 3], [2, 5, 6, 3]], "token_type_ids": [[0, 0, 0], [0, 0, 1, 1]], "labels": 1},
            {
                "input_ids": torch.tensor([[2, 3], [2, 6]]),
                "token_type_ids": [[0, 0], [0, 1]],
                "labels": torch.tensor(0),
            },
        ]
    )
    assert choices["input_ids"].shape == (2, 2, 4) and choices["token_type_ids"].shape == (2, 2, 4)
    assert choices["input_ids"].tolist() == [[[2, 5, 3, 0], [2, 5, 6, 3]], [[2, 3, 0, 0], [2, 6, 0, 0]]]
    assert choices["token_type_ids"][0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]
    assert choices["labels"].tolist() == [1, 0] and choices["labels"].dtype == torch.long

    unlabelled = KAdapterDataCollator(bert_tokenizer)([{"input_ids": [2], "labels": None}, {"input_ids": [2, 3]}])
    assert set(unlabelled) == {"input_ids"}
    with pytest.raises(ValueError, match="'labels' needs a number"):
        KAdapterDataCollator(bert_tokenizer)([{"input_ids": [2], "labels": None}, {"input_ids": [2], "labels": 1}])
    with pytest.raises(ValueError, match="same leading shape"):
        KAdapterDataCollator(bert_tokenizer)([{"input_ids": [[2, 3]]}, {"input_ids": [[2, 3], [2, 3]]}])
    with pytest.raises(ValueError, match="different shapes"):
        KAdapterDataCollator(bert_tokenizer)([{"input_ids": [2], "extra": [1]}, {"input_ids": [2], "extra": [1, 2]}])
    with pytest.raises(ValueError, match="label_kind='multi_hot'"):
        KAdapterDataCollator(bert_tokenizer)(
            [{"input_ids": [2], "labels": [0, 1]}, {"input_ids": [2], "labels": [1, 0]}]
        )
    with pytest.raises(ValueError, match="label_kind"):
        KAdapterDataCollator(bert_tokenizer, label_kind="span")


# ----- end to end --------------------------------------------------------------------------------------------------
def test_preprocessed_batch_trains_factual_head(base_dirs, bert_tokenizer):
    trex = load_factual(FIXTURES / "trex_train.json")
    label2id = build_label_vocab(trex)
    data = preprocess_factual(trex, bert_tokenizer, label2id)
    batch = KAdapterDataCollator(bert_tokenizer)(list(data))
    assert batch["input_ids"].max() < len(BERT_VOCAB)
    model = make_model(
        base_dirs["bert"], cls=hk.KAdapterForFactualPretraining, num_labels=len(label2id),
        adapters={"factual": tiny_adapter()},
    )  # fmt: skip
    model.train()
    out = model(**batch)
    assert out.logits.shape == (6, len(label2id)) and torch.isfinite(out.loss)
    out.loss.backward()
