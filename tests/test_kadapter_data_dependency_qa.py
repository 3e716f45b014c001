"""Dependency-head labels (linguistic adapter), SQuAD span features and CosmosQA multiple choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import make_model, tiny_adapter
from transformers import BertTokenizer, RobertaTokenizerFast

import hf_kadapter as hk
from hf_kadapter.kadapter.data.collator import KAdapterDataCollator
from hf_kadapter.kadapter.data.dependency import (
    load_dependency_records,
    parse_dependencies,
    preprocess_dependency,
    save_dependency_records,
)
from hf_kadapter.kadapter.data.qa import (
    load_multiple_choice,
    load_squad,
    postprocess_squad_predictions,
    preprocess_multiple_choice,
    preprocess_squad_eval,
    preprocess_squad_train,
)
from hf_kadapter.kadapter.data.records import DataFormatError, DataReport

FIXTURES = Path(__file__).parent / "fixtures"

# Under 64 entries: the tiny BERT base of conftest has a 64-word vocabulary.
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "un", "##believ"]
BERT_VOCAB += ["##able", ".", "she", "sold", "it", "where", "did", "sit", "?", "who", "when", "sell", "sunday"]
BERT_VOCAB += ["to", "roof", "in", "a", "box", "none", "of", "above", "choices", "monday", "friday", "never"]

# "the unbelievable cat sat on the mat": "mat", the LAST word, heads "the" (the official code dropped such
# sentences); "sat" is the root; "unbelievable" splits into three subwords.
WORDS = ["the", "unbelievable", "cat", "sat", "on", "the", "mat"]
HEADS = [2, 2, 3, 3, 3, 6, 4]
# Subword positions, identical for both tokenizers built below:
# 0 [CLS]/<s>  1 the  2 un  3 ##believ  4 ##able  5 cat  6 sat  7 on  8 the  9 mat  10 [SEP]/</s>
X = -100
EXPECTED_CLS_ROOT = [X, 5, 5, X, X, 6, 0, 6, 9, 7, X]
EXPECTED_SELF_ROOT = [X, 5, 5, X, X, 6, 6, 6, 9, 7, X]


def bert_tokenizer(folder: Path) -> BertTokenizer:
    path = folder / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return BertTokenizer(vocab=str(path))


def roberta_tokenizer(folder: Path, add_prefix_space: bool = False) -> RobertaTokenizerFast:
    """A byte-level BPE whose merges produce exactly these pieces (a trained one would split unpredictably)."""
    pieces = ["Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġmat", "Ġun", "believ", "able", "Ġsunday", "Ġ.", "Ġ?", "Ġshe"]
    pieces += ["Ġsold", "Ġit", "Ġto", "Ġdid", "Ġsit", "Ġsell", "where", "who", "when", "the"]
    alphabet = sorted(set("".join(pieces)) | set("abcdefghijklmnopqrstuvwxyz.?"))
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *alphabet])}
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            if (piece[: end - 1], piece[end - 1]) not in merges:
                merges.append((piece[: end - 1], piece[end - 1]))
            vocab.setdefault(piece[:end], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return RobertaTokenizerFast(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), add_prefix_space=add_prefix_space
    )


@pytest.fixture(params=["bert", "roberta", "roberta-prefix-space"])
def tokenizer(request, tmp_path):
    if request.param == "bert":
        return bert_tokenizer(tmp_path)
    return roberta_tokenizer(tmp_path, add_prefix_space=request.param.endswith("space"))


def sentence() -> datasets.Dataset:
    return datasets.Dataset.from_list([{"tokens": WORDS, "heads": HEADS}])


# ----- dependency labels --------------------------------------------------------------------------------------
def test_dependency_labels_token_by_token(tokenizer):
    features = preprocess_dependency(sentence(), tokenizer)
    pieces = [p.replace("Ġ", "").replace("##", "") for p in tokenizer.convert_ids_to_tokens(features[0]["input_ids"])]
    assert pieces[1:-1] == ["the", "un", "believ", "able", "cat", "sat", "on", "the", "mat"]

    report = DataReport()
    features = preprocess_dependency(sentence(), tokenizer, report=report)
    assert features[0]["labels"] == EXPECTED_CLS_ROOT
    assert report.kept == 1 and not report.notes
    assert set(features.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "tokens" not in features.column_names
    assert ("token_type_ids" in features.column_names) == ("token_type_ids" in tokenizer.model_input_names)

    assert preprocess_dependency(sentence(), tokenizer, root="self")[0]["labels"] == EXPECTED_SELF_ROOT


def test_roberta_words_get_the_running_text_prefix_space(tmp_path):
    # Without add_prefix_space the tokenizer would encode "cat" instead of "Ġcat"; preprocessing fixes that.
    plain = preprocess_dependency(sentence(), roberta_tokenizer(tmp_path))
    spaced = preprocess_dependency(sentence(), roberta_tokenizer(tmp_path, add_prefix_space=True))
    assert plain[0]["input_ids"] == spaced[0]["input_ids"]


def test_truncation_never_gives_a_wrong_label(tokenizer):
    # max_length 10 keeps [CLS] + 8 subwords: "mat" (head of the second "the") is cut away.
    report = DataReport()
    features = preprocess_dependency(sentence(), tokenizer, max_length=10, report=report)
    assert features[0]["labels"] == [X, 5, 5, X, X, 6, 0, 6, X, X]
    assert report.notes["head cut by truncation (label ignored)"] == 1
    assert report.notes["words cut by truncation"] == 1

    # max_length 4 keeps "the" and half of "unbelievable": both heads ("cat") are cut, nothing is left.
    more = datasets.Dataset.from_list([{"tokens": WORDS, "heads": HEADS}, {"tokens": ["the", "cat"], "heads": [1, 1]}])
    report = DataReport()
    features = preprocess_dependency(more, tokenizer, max_length=4, report=report)
    assert len(features) == 1 and features[0]["labels"] == [X, 2, 0, X]
    assert report.skipped == 1 and report.reasons["no labelled token left after truncation"] == 1
    with pytest.raises(ValueError, match="dependency record 0.*no labelled token"):
        preprocess_dependency(more, tokenizer, max_length=4, on_error="raise")


def test_dependency_records_load_save_and_official_format(tmp_path):
    records = load_dependency_records(FIXTURES / "dep_sentences.jsonl")
    assert records[0] == {"tokens": WORDS, "heads": HEADS}
    path = save_dependency_records(records, tmp_path / "out" / "parsed.jsonl")
    assert load_dependency_records(path)[:] == records[:]
    assert [p.name for p in path.parent.iterdir()] == ["parsed.jsonl"]  # no temp file left behind

    official = load_dependency_records(FIXTURES / "dep_findhead.json")
    assert official[0] == {"tokens": ["she", "sold", "it", "."], "heads": [1, 1, 1, 1]}
    # Governor = the last word (index 3, 1-based): the official label construction dropped this sentence.
    assert official[1] == {"tokens": ["the", "big", "cat"], "heads": [2, 2, 2]}


def test_malformed_dependency_records_name_file_line_field(tmp_path):
    path = FIXTURES / "dep_malformed.jsonl"
    with pytest.raises(DataFormatError, match=r"dep_malformed\.jsonl, line 2, field 'heads'.*outside") as error:
        load_dependency_records(path)
    assert error.value.line == 2 and error.value.field == "heads"
    report = DataReport()
    assert len(load_dependency_records(path, on_error="skip", report=report)) == 1
    assert report.skipped == 3 and any("exactly one root" in reason for reason in report.reasons)
    with pytest.raises(ValueError, match="record 0, field 'heads'"):
        save_dependency_records([{"tokens": ["a", "b"], "heads": [0, 1]}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_spacy_parses_sentences():
    pytest.importorskip("spacy")
    try:
        nlp = hk.kadapter.data.dependency.load_spacy_parser()
    except ImportError as error:
        pytest.skip(str(error))
    records = parse_dependencies(["The cat sat on the mat.  She sold it yesterday."], nlp=nlp, progress=False)
    assert len(records) == 2
    first = records[0]
    assert first["tokens"][:3] == ["The", "cat", "sat"]
    assert first["tokens"][first["heads"][1]] == "sat"  # nsubj: cat <- sat
    for record in records:  # valid trees, the root its own head, no whitespace tokens
        hk.kadapter.data.dependency.validate_dependency_record(record)
        assert all(token.strip() for token in record["tokens"])


def test_dependency_batch_through_the_model(base_dirs, tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    features = preprocess_dependency(load_dependency_records(FIXTURES / "dep_sentences.jsonl"), tokenizer, 32)
    inputs = KAdapterDataCollator(tokenizer, label_kind="token")(list(features))
    length = inputs["input_ids"].shape[1]
    assert inputs["labels"][1, len(features[1]["labels"]) :].eq(-100).all()  # padding is never a head

    model = make_model(
        base_dirs["bert"],
        cls=hk.KAdapterForDependencyPretraining,
        adapters={"linguistic": tiny_adapter()},
        max_head_positions=32,
    )
    output = model(**inputs)
    assert output.logits.shape == (2, length, length)
    assert math.isfinite(output.loss.item())
    output.loss.backward()


# ----- SQuAD --------------------------------------------------------------------------------------------------
def test_squad_loading():
    examples = load_squad(FIXTURES / "squad_tiny.json")
    assert examples["id"] == ["q-mat", "q-cat", "q-sunday"]
    assert examples[1]["answers"] == {"text": ["the cat", "cat"], "answer_start": [0, 4]}
    assert examples[2]["title"] == "Sales"


def test_squad_malformed_names_file_question_and_field():
    path = FIXTURES / "squad_bad_answer.json"
    with pytest.raises(DataFormatError, match=r"squad_bad_answer\.json, line \d+, field .*answer_start.*q-sunday") as e:
        load_squad(path)
    assert "qas[0].answers[0].answer_start" in e.value.field
    assert '"q-sunday"' in path.read_text().splitlines()[e.value.line - 1]
    report = DataReport()
    assert len(load_squad(path, on_error="skip", report=report)) == 2 and report.skipped == 1


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_squad_features_and_postprocessing(kind, tmp_path):
    tokenizer = bert_tokenizer(tmp_path) if kind == "bert" else roberta_tokenizer(tmp_path)
    examples = load_squad(FIXTURES / "squad_tiny.json")
    train = preprocess_squad_train(examples, tokenizer, max_length=32, doc_stride=8)
    evaluation = preprocess_squad_eval(examples, tokenizer, max_length=32, doc_stride=8)
    assert len(train) == len(evaluation) > len(examples)  # the long context is split into windows
    assert {"start_positions", "end_positions", "input_ids", "attention_mask"} <= set(train.column_names)
    assert {"example_id", "offset_mapping"} <= set(evaluation.column_names)

    gold = dict(zip(examples["id"], (a["text"][0] for a in examples["answers"]), strict=True))
    windows_without_answer = 0
    start_logits = np.zeros((len(train), 40))  # wider than the features, as Trainer pads predictions
    end_logits = np.zeros((len(train), 40))
    for i, feature in enumerate(train):
        start, end = feature["start_positions"], feature["end_positions"]
        if start == 0:
            assert end == 0
            windows_without_answer += 1
            continue
        offsets = evaluation[i]["offset_mapping"]
        context = examples[examples["id"].index(evaluation[i]["example_id"])]["context"]
        assert context[offsets[start][0] : offsets[end][1]] == gold[evaluation[i]["example_id"]]
        start_logits[i, start] = end_logits[i, end] = 10.0
    assert windows_without_answer > 0
    predictions = postprocess_squad_predictions(examples, evaluation, start_logits, end_logits)
    assert predictions == gold


def test_squad_long_questions_are_cut_not_crashing(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    examples = load_squad(FIXTURES / "squad_tiny.json")
    report = DataReport()
    features = preprocess_squad_eval(
        examples, tokenizer, max_length=32, doc_stride=8, max_question_length=3, report=report
    )
    question = features[0]["input_ids"][1 : features[0]["input_ids"].index(tokenizer.sep_token_id)]
    assert tokenizer.convert_ids_to_tokens(question) == ["where", "did", "the"]
    assert report.notes["question cut to 3 tokens"] == 3
    with pytest.raises(ValueError, match="no room for a question"):
        preprocess_squad_train(examples, tokenizer, max_length=12, doc_stride=8)


# ----- multiple choice ----------------------------------------------------------------------------------------
def test_multiple_choice_shapes(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    examples = load_multiple_choice(FIXTURES / "cosmosqa_tiny.jsonl")
    assert examples[0]["choices"][0] == "on the mat" and examples["label"] == [0, 2]
    features = preprocess_multiple_choice(examples, tokenizer, max_length=24)
    assert features["labels"] == [0, 2]
    batch = KAdapterDataCollator(tokenizer)(list(features))
    assert batch["input_ids"].shape[:2] == (2, 4) and batch["labels"].tolist() == [0, 2]
    for feature in features:
        ids = torch.tensor(feature["input_ids"])
        assert ids.shape[0] == 4 and ids.shape[1] <= 24
        assert torch.tensor(feature["attention_mask"]).shape == ids.shape
        assert torch.tensor(feature["token_type_ids"]).shape == ids.shape
    # context first, then question [SEP] answer, as the official CosmosQA script
    first = " ".join(tokenizer.convert_ids_to_tokens(features[0]["input_ids"][0]))
    assert first.startswith("[CLS] the cat sat on the mat . [SEP] where did the cat sit ? [SEP] on the mat [SEP]")

    generic = load_multiple_choice(FIXTURES / "cosmosqa_choices.json")
    fixed = preprocess_multiple_choice(generic, tokenizer, max_length=16, padding="max_length")
    assert torch.tensor(fixed["input_ids"]).shape == (2, 3, 16)
    assert generic["id"] == ["0", "1"]

    unlabelled = load_multiple_choice(FIXTURES / "cosmosqa_tiny.jsonl", with_labels=False)
    assert "labels" not in preprocess_multiple_choice(unlabelled, tokenizer).column_names


def test_multiple_choice_malformed_names_file_line_field():
    path = FIXTURES / "cosmosqa_malformed.jsonl"
    with pytest.raises(DataFormatError, match=r"cosmosqa_malformed\.jsonl, line 2, field 'label'.*outside"):
        load_multiple_choice(path)
    with pytest.raises(DataFormatError, match=r"line 1, field 'answer0'.*4 choices, expected 3"):
        load_multiple_choice(path, num_choices=3)
