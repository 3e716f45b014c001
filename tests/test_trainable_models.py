"""PELTModel, RealmKnowledgeAugmentedMLM and OpenQAReader are PreTrainedModels: the plain Trainer path (default
TrainingArguments, the package's collators) trains, checkpoints and resumes; gradient checkpointing; dtype=; the
inference helpers run in eval mode and give the caller's mode back."""

from __future__ import annotations

import pytest
import torch
from conftest import DOCS, batch, char_tokenizer, make_model, tiny_bert_config
from datasets import Dataset
from transformers import BertForMaskedLM, BertModel, Trainer, TrainingArguments

import hf_kadapter as hk
from hf_kadapter.retrieval.reader import ask


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Default TrainingArguments (remove_unused_columns=True ...) but a tiny, quiet CPU run."""
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.fixture
def pelt_setup(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config())
    corpus = [
        {"text": t, "mentions": [{"char_start": 0, "char_end": len(t.split()[0]), "entity_id": e}]}
        for t, e in (("paris is in france.", "Q90"), ("rome is in italy.", "Q220"), ("oslo is cold.", "Q585"))
    ]
    names = {"Q90": "paris", "Q220": "rome", "Q585": "oslo"}
    table = hk.build_entity_table(mlm, tokenizer, corpus, entity_names=names, progress=False)
    return mlm, tokenizer, table


def pelt_features(pelt: hk.PELTTokenizer, texts: list[str]) -> Dataset:
    """PELTTokenizer rows (unpadded lists, ragged entity fields) with masked-LM labels on the non-slot tokens."""
    rows = []
    for text in texts:
        encoding = dict(pelt(text, link=True))
        slots = set(encoding["entity_positions"])
        encoding["labels"] = [t if i not in slots else -100 for i, t in enumerate(encoding["input_ids"])]
        rows.append(encoding)
    return Dataset.from_list(rows)


# ----- PELT --------------------------------------------------------------------------------------------------------
def test_pelt_model_trains_checkpoints_and_resumes_with_the_plain_trainer(pelt_setup, tmp_path):
    mlm, tokenizer, table = pelt_setup
    pelt = hk.PELTTokenizer(tokenizer, table)
    train = pelt_features(pelt, ["paris is in france.", "rome is cold.", "oslo is in italy.", "paris is cold."])
    assert len({len(ids) for ids in train["input_ids"]}) > 1 and {"entity_positions"} <= set(train.column_names)
    initial = {k: v.clone() for k, v in mlm.state_dict().items()}

    def run(output_dir, resume=None):
        mlm.load_state_dict(initial)
        model = hk.PELTModel(mlm, table)
        Trainer(
            model=model, args=training_args(output_dir), train_dataset=train, data_collator=hk.PELTDataCollator(pelt)
        ).train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = run(tmp_path / "run")  # before: "Some tensors share memory" at the first checkpoint (tied embeddings)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "entity_table" / "entity_table.safetensors").is_file()
    reloaded = hk.PELTModel.from_pretrained(checkpoint)
    assert reloaded.table.entity_ids == table.entity_ids
    resumed = run(tmp_path / "run", resume=str(checkpoint))
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pelt_collator_keeps_slots_on_their_tokens(pelt_setup, side):
    mlm, tokenizer, table = pelt_setup
    tokenizer.padding_side = side
    pelt = hk.PELTTokenizer(tokenizer, table)
    rows = [dict(pelt(text, link=True)) for text in ["paris is in france.", "oslo.", "a b"]]
    collated = hk.PELTDataCollator(pelt)(rows)
    assert collated["entity_positions"].shape == (3, 1) and collated["entity_positions"][2, 0] == -1
    model = hk.PELTModel(mlm.eval(), table)
    embeds = model.inputs_embeds(collated["input_ids"], collated["entity_positions"], collated["entity_ids"])
    with torch.no_grad():
        together = model(**collated).logits
        for i, row in enumerate(rows):
            shift = collated["input_ids"].shape[1] - len(row["input_ids"]) if side == "left" else 0
            for position, entity in zip(row["entity_positions"], row["entity_ids"], strict=True):
                assert collated["entity_positions"][i, 0] == position + shift  # moved right by the left padding
                assert collated["input_ids"][i, position + shift] == tokenizer.mask_token_id
                torch.testing.assert_close(embeds[i, position + shift], table.vectors([entity])[0])
            if side == "right":  # BERT's absolute positions: right padding leaves every token where it was
                alone = model(**{k: torch.tensor([v]) for k, v in row.items()}).logits[0]
                torch.testing.assert_close(together[i, : len(row["input_ids"])], alone, atol=1e-5, rtol=1e-5)


def test_pelt_collator_stacks_multi_label_targets_and_pads_token_labels(pelt_setup):
    """A multi-hot target row (entity typing through PELT) is one vector per example, never padded like token
    labels; per-token integer labels (masked LM) still are."""
    _, tokenizer, table = pelt_setup
    pelt = hk.PELTTokenizer(tokenizer, table)
    rows = [dict(pelt(text, link=True)) for text in ["paris is in france.", "oslo."]]
    typed = [{**row, "labels": [1.0, 0.0, 1.0]} for row in rows]
    assert hk.PELTDataCollator(pelt)(typed)["labels"].tolist() == [[1.0, 0.0, 1.0]] * 2
    masked = [{**row, "labels": [-100] * len(row["input_ids"])} for row in rows]
    labels = hk.PELTDataCollator(pelt)(masked)["labels"]
    assert labels.shape == (2, max(len(row["input_ids"]) for row in rows)) and bool((labels == -100).all())


# ----- REALM ---------------------------------------------------------------------------------------------------------
def test_realm_mlm_trains_checkpoints_and_resumes_with_the_plain_trainer(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    embedder = hk.RetrieverEmbedder.from_encoder(
        BertModel(tiny_bert_config(), add_pooling_layer=False), projection_dim=8
    )
    retriever = hk.RealmStyleRetriever(embedder, tokenizer)
    corpus = Dataset.from_dict({key: [d[i] for d in DOCS] for i, key in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=3, max_length=24, progress=False)
    model = hk.RealmKnowledgeAugmentedMLM(BertForMaskedLM(tiny_bert_config()), retriever, k=2, doc_max_length=24)

    texts = Dataset.from_dict({"text": [d[2].title() for d in DOCS] * 2, "exclude_ids": [d[0] for d in DOCS] * 2})
    train = texts.map(
        hk.salient_span_features,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": 24, "use_spacy": False},
        remove_columns=["text"],
    )
    assert all(spans for spans in train["salient_spans"])  # "Paris", "France" ... (the regex fallback)
    collator = hk.RealmSalientSpanCollator(tokenizer, seed=0)
    projection = embedder.query_tower.projection.weight.detach().clone()
    trainer = Trainer(model=model, args=training_args(tmp_path / "realm"), train_dataset=train, data_collator=collator)
    trainer.train()
    assert not torch.equal(embedder.query_tower.projection.weight, projection)  # the retriever learns from the MLM
    checkpoint = tmp_path / "realm" / "checkpoint-2"
    assert (checkpoint / "retriever" / "index").is_dir()
    restored = hk.RealmKnowledgeAugmentedMLM.from_pretrained(checkpoint)
    assert restored.retriever.index.ids == retriever.index.ids
    trainer = Trainer(model=model, args=training_args(tmp_path / "realm"), train_dataset=train, data_collator=collator)
    assert trainer.train(resume_from_checkpoint=str(checkpoint)).global_step == 4


def test_salient_span_collator_masks_one_span_and_passes_exclusions(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    features = hk.salient_span_features(["Paris is in France.", "plain words"], tokenizer, use_spacy=False)
    rows = [dict(zip(features, values, strict=True)) for values in zip(*features.values(), strict=True)]
    rows[0]["exclude_ids"], rows[1]["exclude_ids"] = "d0", ["d1", "d2"]
    out = hk.RealmSalientSpanCollator(tokenizer, seed=0)(rows)
    assert out["exclude_ids"] == [["d0"], ["d1", "d2"]]
    masked = out["labels"][0] != -100
    start, end = masked.nonzero().flatten()[[0, -1]].tolist()
    assert [start, end + 1] in rows[0]["salient_spans"] and masked.sum() == end + 1 - start
    assert (out["input_ids"][0][masked] == tokenizer.mask_token_id).all()
    assert (out["labels"][1] != -100).sum() == 1  # no salient span: one random token


# ----- gradient checkpointing and dtype ---------------------------------------------------------------------------------
def _reader(seed: int = 0) -> hk.OpenQAReader:
    torch.manual_seed(seed)
    return hk.OpenQAReader(BertModel(tiny_bert_config(num_hidden_layers=2), add_pooling_layer=False), max_span_width=3)


def _reader_inputs():
    input_ids = torch.randint(5, 40, (1, 2, 10), generator=torch.Generator().manual_seed(0))
    doc_mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    doc_mask[..., 4:9] = True
    answer = torch.zeros(1, 2, 10, 3, dtype=torch.bool)
    answer[0, 0, 5, 1] = True
    return {"input_ids": input_ids, "attention_mask": torch.ones(1, 2, 10), "doc_mask": doc_mask, "answer_mask": answer}


@pytest.mark.parametrize("kind", ["kadapter", "pelt", "reader"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, base_dirs, pelt_setup):
    def build():
        if kind == "kadapter":
            model = make_model(base_dirs["bert"], hk.KAdapterForSequenceClassification, num_labels=2)
            model.unfreeze_base()  # the paper's fine-tuning regime: the base trains (and is checkpointed)
            return model, {**batch(), "labels": torch.tensor([0, 1, 1])}
        if kind == "pelt":
            mlm, tokenizer, table = pelt_setup
            inputs = dict(hk.PELTTokenizer(tokenizer, table)("paris is cold.", link=True, return_tensors="pt"))
            return hk.PELTModel(mlm, table), {**inputs, "labels": inputs["input_ids"]}
        return _reader(), _reader_inputs()

    grads = []
    for checkpointing in (False, True):
        model, inputs = build()
        model.train()
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_dtype_on_from_pretrained(pelt_setup, tmp_path):
    mlm, _, table = pelt_setup
    hk.PELTModel(mlm, table).save_pretrained(tmp_path / "pelt")
    _reader().save_pretrained(tmp_path / "reader")
    for cls, folder in ((hk.PELTModel, "pelt"), (hk.OpenQAReader, "reader")):
        model = cls.from_pretrained(tmp_path / folder, dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reader = hk.OpenQAReader.from_pretrained(tmp_path / "reader", dtype=torch.bfloat16)
    assert reader(**_reader_inputs()).span_logits.dtype == torch.bfloat16


# ----- inference helpers --------------------------------------------------------------------------------------------------
def test_ask_runs_in_eval_mode_and_restores_the_mode(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    embedder = hk.RetrieverEmbedder.from_encoder(
        BertModel(tiny_bert_config(), add_pooling_layer=False), projection_dim=8
    )
    retriever = hk.RealmStyleRetriever(embedder, tokenizer)
    corpus = Dataset.from_dict({key: [d[i] for d in DOCS] for i, key in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=3, max_length=24, progress=False)
    torch.manual_seed(1)
    encoder = BertModel(tiny_bert_config(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    reader = hk.OpenQAReader(encoder, span_hidden_size=8, max_span_width=3).train()  # as right after training
    embedder.train()
    answers = {ask("where is paris?", retriever, reader, tokenizer, k=2) for _ in range(6)}
    answers.add(reader.ask("where is paris?", retriever, tokenizer, k=2))
    assert len(answers) == 1  # dropout off while answering: one question, one answer
    assert reader.training and encoder.training and embedder.training  # the caller's mode is back
