"""OpenQAReader: the joint span marginal against a hand computation, training on a toy corpus, ask(), EM/F1,
and composition with K-Adapter encoders and PELT-slotted inputs."""

from __future__ import annotations

import math
import string

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertModel, BertTokenizer

import hf_kadapter as hk
from hf_kadapter.pelt.modeling_pelt import pelt_inputs_embeds
from hf_kadapter.pelt.table import EntityLookupTable
from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder
from hf_kadapter.retrieval.reader import (
    NEG_INF,
    OpenQAReader,
    ask,
    evaluate_open_qa,
    marginal_loss,
    prepare_reader_inputs,
)
from hf_kadapter.retrieval.retriever import RealmStyleRetriever

torch.set_num_threads(1)

VOCAB_TOKENS = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase)
    + [f"##{c}" for c in string.ascii_lowercase]
    + list(string.digits)
    + list(".,?")
)

DOCS = [
    ("d0", "paris", "paris is the capital of france."),
    ("d1", "berlin", "berlin is the capital of germany."),
    ("d2", "rome", "rome is the capital of italy."),
    ("d3", "madrid", "madrid is the capital of spain."),
    ("d4", "lisbon", "lisbon is the capital of portugal."),
    ("d5", "vienna", "vienna is the capital of austria."),
]
QUESTIONS = ["capital of france?", "capital of italy?", "capital of spain?"]
ANSWERS = ["paris", "rome", "madrid"]
GOLD_DOCS = ["d0", "d2", "d3"]


def bert_config(hidden: int = 32, layers: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=len(VOCAB_TOKENS),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config(), add_pooling_layer=False)


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizer:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB_TOKENS) + "\n")
    return BertTokenizer(vocab=str(vocab))


@pytest.fixture
def retriever(tokenizer) -> RealmStyleRetriever:
    torch.manual_seed(1)
    encoder = BertModel(bert_config(hidden=16, layers=1), add_pooling_layer=False)
    embedder = RetrieverEmbedder.from_encoder(encoder, shared=False, projection_dim=8)
    retriever = RealmStyleRetriever(embedder, tokenizer)
    corpus = Dataset.from_dict({k: [d[i] for d in DOCS] for i, k in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=6, max_length=32, progress=False)
    return retriever


def test_marginal_loss_matches_hand_computation():
    # 2 documents, length 3, width 2: a few finite spans, the rest invalid.
    logits = torch.full((1, 2, 3, 2), NEG_INF)
    logits[0, 0, 0, 0], logits[0, 0, 1, 1], logits[0, 1, 0, 0], logits[0, 1, 2, 0] = 1.0, 2.0, 0.5, -1.0
    answer = torch.zeros(1, 2, 3, 2, dtype=torch.bool)
    answer[0, 0, 1, 1] = answer[0, 1, 0, 0] = True
    answer[0, 1, 1, 1] = True  # an invalid span marked correct is ignored
    loss, has_answer = marginal_loss(logits, answer)
    total = math.exp(1.0) + math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)
    expected = -math.log((math.exp(2.0) + math.exp(0.5)) / total)
    assert has_answer.tolist() == [True]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_reader_adds_retrieval_score_and_masks_missing_answers(tokenizer):
    torch.manual_seed(0)
    reader = OpenQAReader(tiny_bert(), span_hidden_size=16, max_span_width=4).eval()
    docs = [[DOCS[0][2], DOCS[1][2]], [DOCS[1][2], DOCS[2][2]]]
    # character wordpieces: "pa" is 2 tokens (p ##a), inside max_span_width=4; "paris" (5 tokens) would not be
    kwargs = dict(answers=["pa", "pa"], max_span_width=4)
    assert not prepare_reader_inputs(tokenizer, QUESTIONS[:2], docs, **kwargs)["answer_mask"].any()  # whole words
    inputs = prepare_reader_inputs(tokenizer, QUESTIONS[:2], docs, whole_words=False, **kwargs)
    assert inputs["answer_mask"].shape == (2, 2, inputs["input_ids"].shape[-1], 4)
    rs = torch.tensor([[0.3, -1.2], [2.0, 0.1]], requires_grad=True)
    plain = reader(**{k: v for k, v in inputs.items() if k != "answer_mask"})
    out = reader(**inputs, retrieval_scores=rs)
    valid = plain.span_logits > NEG_INF / 2
    assert torch.allclose(out.span_logits[valid], (plain.span_logits + rs.detach()[:, :, None, None])[valid])
    # spans stay inside the document part and are at most max_span_width long
    assert not bool(valid[~inputs["doc_mask"]].any())
    # question 2's documents (berlin, rome) contain no "pa" span -> masked, as REALM drops it
    assert inputs["answer_mask"][0, 0].any() and not inputs["answer_mask"][1].any()
    assert out.has_answer.tolist() == [True, False]
    out.loss.backward()
    assert rs.grad is not None and rs.grad[0].abs().sum() > 0 and rs.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="no retrieved document"):
        reader(**inputs, retrieval_scores=rs, on_missing="raise")
    shifted = {**inputs, "doc_mask": inputs["doc_mask"][..., 1:]}  # one token short: spans would shift silently
    with pytest.raises(ValueError, match="doc_mask has shape"):
        reader(**shifted)


def test_training_makes_ask_answer(tokenizer, retriever):
    torch.manual_seed(0)
    reader = OpenQAReader(tiny_bert(), span_hidden_size=32, max_span_width=10)
    k = len(DOCS)  # the whole toy corpus: every question has its answer document among the candidates
    before = evaluate_open_qa(QUESTIONS, ANSWERS, retriever, reader.eval(), tokenizer, k=k)
    params = list(reader.parameters()) + list(retriever.embedder.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    reader.train()
    for _ in range(30):
        retrieval = retriever.retrieve(QUESTIONS, k=k)
        inputs = prepare_reader_inputs(tokenizer, QUESTIONS, retrieval.texts, answers=ANSWERS)
        out = reader(**inputs, retrieval_scores=retrieval.scores)
        assert bool(out.has_answer.all())
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
    reader.eval()
    after = evaluate_open_qa(QUESTIONS, ANSWERS, retriever, reader, tokenizer, k=k)
    assert before["exact_match"] < 100.0
    assert after["exact_match"] == 100.0 and after["f1"] == 100.0
    for question, answer, doc in zip(QUESTIONS, ANSWERS, GOLD_DOCS, strict=True):
        text, doc_id, score = ask(question, retriever, reader, tokenizer, k=k)
        assert text == answer and doc_id == doc and math.isfinite(score)


def test_kadapter_model_as_reader_encoder(tokenizer):
    torch.manual_seed(0)
    adapter = hk.KnowledgeAdapterConfig(tap_layers=[1, 2], hidden_size=16, num_attention_heads=2, intermediate_size=32)
    encoder = hk.KAdapterModel.from_base(tiny_bert(), adapters={"factual": adapter})
    reader = OpenQAReader(encoder, span_hidden_size=16, max_span_width=6)
    docs = [[DOCS[0][2], DOCS[1][2]]]
    inputs = prepare_reader_inputs(tokenizer, QUESTIONS[:1], docs, answers=["paris"], max_span_width=6)
    out = reader(**inputs, retrieval_scores=torch.tensor([[0.5, 0.1]]))
    assert out.has_answer.tolist() == [True] and torch.isfinite(out.loss)
    out.loss.backward()
    adapter_grads = [p.grad for n, p in encoder.named_parameters() if n.startswith("adapters.") and p.requires_grad]
    assert adapter_grads and any(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    assert reader.span_output.weight.grad.abs().sum() > 0


def test_pelt_slotted_inputs_go_through_reader(tokenizer):
    torch.manual_seed(0)
    bert = tiny_bert()
    reader = OpenQAReader(bert, span_hidden_size=16, max_span_width=6).eval()
    table = EntityLookupTable(
        entity_ids=["Q90"], sums=torch.randn(1, 32) * 3, counts=torch.tensor([3]), names=["paris"], norm=7.0
    )
    docs = [[DOCS[0][2], DOCS[1][2]]]
    inputs = prepare_reader_inputs(tokenizer, QUESTIONS[:1], docs, answers=["paris"], max_span_width=6)
    ids = inputs.pop("input_ids")
    flat = ids.view(2, -1)
    # slot the entity into document 0 at the first document token ("p" of paris); none in document 1
    first_doc_token = int(inputs["doc_mask"][0, 0].nonzero()[0])
    positions, entity_ids = torch.tensor([[first_doc_token], [-1]]), torch.tensor([[0], [-1]])
    embeds = pelt_inputs_embeds(bert, table, flat, positions, entity_ids).view(*ids.shape, -1)
    with torch.no_grad():
        slotted = reader(inputs_embeds=embeds, **inputs)
        plain = reader(input_ids=ids, **inputs)
        unslotted = reader(inputs_embeds=bert.get_input_embeddings()(ids), **inputs)
    assert torch.allclose(plain.span_logits, unslotted.span_logits, atol=1e-5)
    assert not torch.allclose(slotted.span_logits[0, 0], plain.span_logits[0, 0])
    assert torch.isfinite(slotted.loss)


def test_padding_documents_get_no_spans(tokenizer):
    reader = OpenQAReader(tiny_bert(), span_hidden_size=8, max_span_width=6).eval()
    inputs = prepare_reader_inputs(tokenizer, QUESTIONS[:1], [[DOCS[0][2], None]], answers=["paris"], max_span_width=6)
    assert inputs["doc_valid"].tolist() == [[True, False]]
    with torch.no_grad():
        out = reader(**inputs, retrieval_scores=torch.tensor([[0.2, float("-inf")]]))
    assert bool((out.span_logits[0, 1] <= NEG_INF / 2).all()) and bool((out.span_logits[0, 0] > NEG_INF / 2).any())
    assert torch.isfinite(out.loss)


def test_mismatched_span_width_is_a_clear_error():
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64))  # fmt: skip
    reader = OpenQAReader(encoder, max_span_width=4)
    inputs = {
        "input_ids": torch.randint(5, 64, (1, 2, 8)),
        "attention_mask": torch.ones(1, 2, 8, dtype=torch.long),
        "doc_mask": torch.ones(1, 2, 8, dtype=torch.bool),
        "answer_mask": torch.zeros(1, 2, 8, 10, dtype=torch.bool),
    }
    with pytest.raises(ValueError, match="max_span_width=4"):
        reader(**inputs)


def test_reader_reads_titles_as_the_embedder_does(tokenizer, retriever, monkeypatch):
    question, text = ["capital of france?"], [["it is the capital of france."]]
    without = prepare_reader_inputs(tokenizer, question, text, answers=["paris"])
    with_titles = prepare_reader_inputs(tokenizer, question, text, answers=["paris"], titles=[["paris"]])
    assert not without["answer_mask"].any() and with_titles["answer_mask"].any()  # reachable only in the title
    ids = with_titles["input_ids"][0, 0]
    tokens = tokenizer.convert_ids_to_tokens(ids[with_titles["attention_mask"][0, 0].bool()].tolist())
    expected = [*tokenizer.tokenize("paris"), "[SEP]", *tokenizer.tokenize(text[0][0]), "[SEP]"]
    assert tokens[tokens.index("[SEP]") + 1 :] == expected
    inner_sep = tokens.index("[SEP]", tokens.index("[SEP]") + 1)
    assert not with_titles["doc_mask"][0, 0, inner_sep]  # no answer span crosses the title / text separator
    assert prepare_reader_inputs(tokenizer, question, text, titles=[[None]])["input_ids"].equal(without["input_ids"])

    import hf_kadapter.retrieval.reader as reader_module

    seen = {}
    original = reader_module.prepare_reader_inputs

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(reader_module, "prepare_reader_inputs", spy)
    reader = OpenQAReader(tiny_bert(), span_hidden_size=8, max_span_width=4)
    reader.ask("capital of france?", retriever, tokenizer, k=2)
    assert seen["titles"] and all(t for row in seen["titles"] for t in row)  # ask/predict pass the titles


def test_over_long_pairs_are_cut_on_the_document_side_with_a_count(tokenizer, caplog):
    long_text = " ".join(["paris"] * 60)
    inputs = prepare_reader_inputs(tokenizer, ["capital?"], [[long_text, "short."]], max_length=24)
    assert inputs["input_ids"].shape[-1] == 24 and inputs["doc_truncated"].tolist() == [[True, False]]
    assert "1 of 2 question + document pairs are longer than max_length=24" in caplog.text
    with pytest.raises(ValueError, match="Question 0 has .* leaves no room for a document"):
        prepare_reader_inputs(tokenizer, [" ".join(["rome"] * 30)], [["x"]], max_length=24)
    # More tokens than the encoder's positions: named, not an index error from inside BERT.
    small = BertModel(BertConfig(vocab_size=len(VOCAB_TOKENS), hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=20))  # fmt: skip
    reader = OpenQAReader(small, span_hidden_size=8, max_span_width=4)
    with pytest.raises(ValueError, match="at most 20: build them with prepare_reader_inputs\\(..., max_length=20\\)"):
        reader(**inputs)
