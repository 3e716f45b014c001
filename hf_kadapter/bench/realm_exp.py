"""REALM on the WordNet suite: retrieval-augmented masked LM training with a refreshed index, then open-domain QA.

Protocol:

1. Corpus: the suite's definitions ("title [SEP] text"). Masked statements are built from the relation facts
   ("Luzon is part of [MASK] [MASK]."; the masked span is the fact's target, a salient span); the knowledge that
   fills the mask is in the subject's definition, somewhere in the corpus.
2. `RealmKnowledgeAugmentedMLM` (embedder = encoder + projection, reader = the masked LM) is trained with the
   standard Trainer on the training entities' statements, three ways at the same budget: with the index refreshed
   in the background every `refresh_every` steps (`IndexRefreshCallback`), with the index built once and never
   refreshed (stale), and closed-book (the masked LM alone, no retrieval).
3. Held-out entities' statements: masked-entity accuracy (the marginal prediction of every masked token right) and
   NLL; retrieval recall@1/5/10 of the subject's definition for statements and for questions, before training and
   after each variant.
4. Open-domain QA on the questions: a REALM span reader trained over the documents the trained retriever returns,
   against the same reader closed-book (null document only) and over the untrained retriever's documents.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import ExperimentResult, GainSpec, UnitStore, seed_everything, train_small
from .wordnet import read_table

STATEMENTS = {
    "instance_of": "{subject} is a {answer}.",
    "part_of": "{subject} is part of {answer}.",
    "member_of": "{subject} is a member of {answer}.",
    "region": "{subject} is associated with {answer}.",
    "topic": "{subject} belongs to {answer}.",
    "has_part": "{answer} is part of {subject}.",
}
MLM_CONDITIONS = {
    "untrained": "the embedder before REALM training (retrieval only)",
    "refreshed": "REALM training with the index refreshed in the background",
    "stale": "REALM training with the index built once, never refreshed",
    "closed_book": "the masked LM trained on the same statements without retrieval",
}
QA_CONDITIONS = {
    "closed_book_reader": "the span reader with the null document only",
    "reader_untrained_retriever": "the span reader over the untrained retriever's documents",
    "reader_trained_retriever": "the span reader over the REALM-trained (refreshed) retriever's documents",
}
RECALL_AT = (1, 5, 10)


@dataclass
class RealmSettings:
    encoder: str
    mlm: str
    seeds: list[int]
    eval_split: str = "test"
    num_documents: int | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    k: int = 4
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 5e-5
    refresh_every: int = 25
    projection_dim: int = 128
    pooling: str = "mean"
    query_max_length: int = 24
    doc_max_length: int = 40
    reader_k: int = 4
    reader_epochs: float = 3.0
    reader_learning_rate: float = 5e-4
    reader_batch_size: int = 8


def statement(question: dict[str, Any]) -> tuple[str, int, int]:
    """(text, answer start, answer end) of a question's fact as a statement with the answer in place."""
    subject = question["question"]
    template = STATEMENTS[question["relation"]]
    name = _subject_name(question)
    answer = question["answers"][0]
    before, after = template.split("{answer}")
    before = before.format(subject=name)
    after = after.format(subject=name)
    del subject
    return before + answer + after, len(before), len(before) + len(answer)


def _subject_name(question: dict[str, Any]) -> str:
    return question["subject"]


def _masked_rows(tokenizer: Any, questions: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Tokenised statements with every token of the answer span masked (labels -100 elsewhere)."""
    rows = []
    for question in questions:
        text, start, end = statement(question)
        encoding = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        labels = [-100] * len(ids)
        for i, (a, b) in enumerate(encoding["offset_mapping"]):
            if b > a and a >= start and b <= end:
                labels[i] = ids[i]
                ids[i] = tokenizer.mask_token_id
        if all(label == -100 for label in labels):
            continue
        rows.append({"input_ids": ids, "attention_mask": list(encoding["attention_mask"]), "labels": labels,
                     "id": question["id"], "gold_document": question["gold_document"]})  # fmt: skip
    return rows


def _pad(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        fills = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        return {key: torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows]) for key, fill in fills.items()}

    return collate


def _recall(retriever: Any, queries: list[dict[str, Any]], collate: Callable, gold: list[str]) -> dict[int, np.ndarray]:
    """Per query, 1.0 when the gold document is in the index's top-k (k in RECALL_AT), searched by the current
    query embedder over the retriever's current index."""
    hits = {k: [] for k in RECALL_AT}
    embedder = retriever.embedder
    was_training = embedder.training
    embedder.eval()
    with torch.no_grad():
        for start in range(0, len(queries), 64):
            batch = collate(queries[start : start + 64])
            embeddings = embedder.embed_queries(batch["input_ids"], batch["attention_mask"])
            _, rows = retriever.index.search(embeddings.float(), max(RECALL_AT))
            for found, target in zip(retriever.index.ids_at(rows), gold[start : start + 64], strict=True):
                for k in RECALL_AT:
                    hits[k].append(float(target in found[:k]))
    embedder.train(was_training)
    return {k: np.array(v) for k, v in hits.items()}


def run_realm(
    settings: RealmSettings, suite_dir: Path, workdir: Path, progress: Callable[[str], None] = print
) -> ExperimentResult:
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer  # noqa: PLC0415

    from ..retrieval import (  # noqa: PLC0415
        IndexRefreshCallback,
        OpenQAReader,
        RealmKnowledgeAugmentedMLM,
        RealmStyleRetriever,
        RetrieverEmbedder,
        prepare_reader_inputs,
    )
    from ..retrieval.reader import best_spans, span_text  # noqa: PLC0415

    result = ExperimentResult(
        method="realm",
        description="Retrieval-augmented masked LM over WordNet definitions, refreshed vs stale index; open QA",
        conditions={**MLM_CONDITIONS, **QA_CONDITIONS},
    )
    workdir.mkdir(parents=True, exist_ok=True)
    units = UnitStore(workdir / "units", {k: v for k, v in vars(settings).items() if k != "seeds"})
    result.units = units
    with result.phase("data"):
        tokenizer = AutoTokenizer.from_pretrained(settings.encoder)
        mlm_tokenizer = AutoTokenizer.from_pretrained(settings.mlm)
        if mlm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"The masked LM {settings.mlm} and the encoder {settings.encoder} have different vocabularies: the "
                "knowledge-augmented MLM reads the retriever's document tokens, so pick an encoder and a masked LM "
                "sharing one tokenizer (e.g. both BERT-uncased, or both RoBERTa)."
            )
        entities = {e["id"]: e for e in read_table("entities", suite_dir)}
        questions = [q for q in read_table("questions", suite_dir) if q["relation"] in STATEMENTS]
        for q in questions:
            q["subject"] = entities[q["entity_id"]]["name"]
        train_q = _limit([q for q in questions if q["split"] == "train"], settings.train_limit)
        eval_q = _limit([q for q in questions if q["split"] == settings.eval_split], settings.eval_limit)
        documents = read_table("documents", suite_dir)
        needed = {q["gold_document"] for q in train_q + eval_q}
        if settings.num_documents is not None and len(documents) > settings.num_documents:
            others = [d for d in documents if d["id"] not in needed]
            keep = needed | {d["id"] for d in random.Random(0).sample(others, max(0, settings.num_documents - len(needed)))}
            documents = [d for d in documents if d["id"] in keep]
        corpus = [{"id": d["id"], "title": d["title"], "text": d["text"]} for d in documents]
        train_rows = _masked_rows(tokenizer, train_q, settings.query_max_length)
        eval_rows = _masked_rows(tokenizer, eval_q, settings.query_max_length)
        eval_gold = [r["gold_document"] for r in eval_rows]
        question_rows = [
            {**{k: list(v) for k, v in tokenizer(q["question"], truncation=True,
                                                 max_length=settings.query_max_length).items()},
             "labels": [], "gold_document": q["gold_document"]}
            for q in eval_q
        ]  # fmt: skip
    result.data.update(
        encoder=settings.encoder, mlm=settings.mlm, documents=len(corpus), train_statements=len(train_rows),
        eval_statements=len(eval_rows), eval_questions=len(eval_q), k=settings.k, steps=settings.steps,
        refresh_every=settings.refresh_every, eval_split=settings.eval_split,
    )  # fmt: skip
    progress(f"  data: {len(corpus)} documents, {len(train_rows)} train / {len(eval_rows)} eval statements")
    collate = _pad(tokenizer)
    questions_collate = _pad(tokenizer)
    strip = [{k: v for k, v in r.items() if k in ("input_ids", "attention_mask", "labels")} for r in train_rows]

    initial_indexes: dict[int, Any] = {}

    def fresh_retriever(seed: int) -> Any:
        """The untrained retriever of a seed (projection initialised from the seed); its index is built once per seed
        and copied, so every condition of a seed starts from the same index."""
        seed_everything(seed)
        embedder = RetrieverEmbedder.from_encoder(
            settings.encoder, projection_dim=settings.projection_dim, pooling=settings.pooling
        )
        retriever = RealmStyleRetriever(embedder, tokenizer)
        if seed not in initial_indexes:
            initial_indexes[seed] = retriever.build_index(
                corpus, batch_size=128, max_length=settings.doc_max_length, progress=False
            )
        retriever.index = copy.deepcopy(initial_indexes[seed])
        retriever.documents = retriever.index.documents if retriever.index.documents is not None else corpus
        return retriever

    def evaluate_retrieval(retriever: Any) -> dict[str, Any]:
        statements = _recall(retriever, eval_rows, collate, eval_gold)
        asked = _recall(retriever, question_rows, questions_collate, [q["gold_document"] for q in question_rows])
        return {f"{kind}_recall@{k}": hits[k].tolist() for kind, found in (("statement", statements),
                                                                           ("question", asked))
                for hits in [found] for k in RECALL_AT}  # fmt: skip

    def evaluate_mlm(model: Any) -> dict[str, Any]:
        model.eval()
        nll, correct = [], []
        with torch.no_grad():
            for start in range(0, len(eval_rows), 16):
                rows = eval_rows[start : start + 16]
                batch = collate(rows)
                out = model(**batch)
                if getattr(out, "marginal_log_likelihood", None) is not None:  # the knowledge-augmented MLM
                    nll += (-out.marginal_log_likelihood).tolist()
                    predicted = out.predicted_token_ids
                else:  # a plain masked LM
                    log_probs = torch.log_softmax(out.logits.float(), -1)
                    labels = batch["labels"]
                    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    nll += (-(picked * (labels != -100)).sum(-1)).tolist()
                    predicted = out.logits.argmax(-1).masked_fill(labels == -100, -100)
                labels = batch["labels"]
                correct += ((predicted == labels) | (labels == -100)).all(-1).float().tolist()
        return {"masked_entity_nll": nll, "masked_entity_accuracy": correct}

    readers: dict[int, Any] = {}
    for seed in settings.seeds:
        # ----- before training -------------------------------------------------------------------------------
        def before(seed: int = seed) -> dict[str, Any]:
            return evaluate_retrieval(fresh_retriever(seed))

        with result.phase("index build + retrieval before training"):
            outcome = units.get_or_run(f"retrieval/untrained/seed{seed}", before)
        _add_recall(result, "untrained", seed, outcome)

        # ----- REALM training, refreshed and stale -------------------------------------------------------------
        for condition in ("refreshed", "stale"):

            def train(condition: str = condition, seed: int = seed) -> dict[str, Any]:
                retriever = fresh_retriever(seed)
                mlm = AutoModelForMaskedLM.from_pretrained(settings.mlm)
                model = RealmKnowledgeAugmentedMLM(mlm, retriever, k=settings.k, add_null=True,
                                                   doc_max_length=settings.doc_max_length)  # fmt: skip
                callbacks = []
                if condition == "refreshed":
                    callbacks.append(IndexRefreshCallback(retriever, every_n_steps=settings.refresh_every,
                                                          batch_size=128, max_length=settings.doc_max_length))
                curve = train_small(model, strip, collate, output_dir=workdir / "trainer", seed=seed,
                                    epochs=_epochs(settings, len(strip)), learning_rate=settings.learning_rate,
                                    batch_size=settings.batch_size, warmup_ratio=0.06, callbacks=callbacks,
                                    max_steps=settings.steps)  # fmt: skip
                outcome = {"curve": curve, **evaluate_retrieval(retriever), **evaluate_mlm(model)}
                if condition == "refreshed":
                    outcome["refreshes"] = callbacks[0].refreshes
                    retriever.save_pretrained(workdir / "retrievers" / f"seed{seed}")
                return outcome

            with result.phase(f"REALM training ({condition})"):
                outcome = units.get_or_run(f"mlm/{condition}/seed{seed}", train)
            _add_recall(result, condition, seed, outcome)
            _add_mlm(result, condition, seed, outcome)
            result.curves.setdefault("realm_loss", {}).setdefault(condition, {})[str(seed)] = outcome["curve"]
            progress(f"  REALM {condition}, seed {seed}: masked-entity accuracy "
                     f"{np.mean(outcome['masked_entity_accuracy']):.3f}, statement recall@5 "
                     f"{np.mean(outcome['statement_recall@5']):.3f}")  # fmt: skip

        def closed(seed: int = seed) -> dict[str, Any]:
            seed_everything(seed)
            mlm = AutoModelForMaskedLM.from_pretrained(settings.mlm)
            curve = train_small(mlm, strip, collate, output_dir=workdir / "trainer", seed=seed,
                                epochs=_epochs(settings, len(strip)), learning_rate=settings.learning_rate,
                                batch_size=settings.batch_size, warmup_ratio=0.06, max_steps=settings.steps)
            return {"curve": curve, **evaluate_mlm(mlm)}  # fmt: skip

        with result.phase("closed-book MLM"):
            outcome = units.get_or_run(f"mlm/closed_book/seed{seed}", closed)
        _add_mlm(result, "closed_book", seed, outcome)
        progress(f"  closed-book MLM, seed {seed}: masked-entity accuracy {np.mean(outcome['masked_entity_accuracy']):.3f}")

        # ----- open-domain QA ------------------------------------------------------------------------------------
        for condition in QA_CONDITIONS:

            def qa(condition: str = condition, seed: int = seed) -> dict[str, Any]:
                if condition == "reader_trained_retriever":
                    retriever = RealmStyleRetriever.from_pretrained(workdir / "retrievers" / f"seed{seed}")
                else:
                    retriever = fresh_retriever(seed)
                seed_everything(seed)
                reader = OpenQAReader(AutoModel.from_pretrained(settings.mlm, add_pooling_layer=False))
                closed_book = condition == "closed_book_reader"

                def documents(batch: list[dict[str, Any]]) -> tuple[list, list | None, torch.Tensor | None]:
                    """Texts, titles and scores of each question's documents (closed book: the null document)."""
                    if closed_book:
                        return [[""] for _ in batch], None, None
                    with torch.no_grad():
                        found = retriever.retrieve([q["question"] for q in batch], k=settings.reader_k, rescore=False,
                                                   doc_max_length=settings.doc_max_length)  # fmt: skip
                    return found.texts, found.titles, found.scores.detach()

                def reader_batch(batch: list[dict[str, Any]], with_answers: bool) -> dict[str, torch.Tensor]:
                    texts, titles, scores = documents(batch)
                    inputs = prepare_reader_inputs(
                        mlm_tokenizer, [q["question"] for q in batch], texts,
                        answers=[q["answers"] for q in batch] if with_answers else None,
                        max_length=settings.query_max_length + settings.doc_max_length,
                        max_span_width=reader.max_span_width, titles=titles,
                    )  # fmt: skip
                    if scores is not None:
                        inputs["retrieval_scores"] = scores
                    return inputs

                reader_rows = [reader_batch(train_q[i : i + settings.reader_batch_size], True)
                               for i in range(0, len(train_q), settings.reader_batch_size)]  # fmt: skip
                trainable = [r for r in reader_rows if bool(r["answer_mask"].any())]
                optimizer = torch.optim.AdamW(reader.parameters(), lr=settings.reader_learning_rate)
                losses = []
                reader.train()
                for epoch in range(int(settings.reader_epochs)):
                    order = list(range(len(trainable)))
                    random.Random(seed * 1000 + epoch).shuffle(order)
                    for i in order:
                        loss = reader(**trainable[i]).loss
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        losses.append(float(loss))
                reader.eval()
                exact = []
                with torch.no_grad():
                    for i in range(0, len(eval_q), 32):
                        batch = eval_q[i : i + 32]
                        inputs = reader_batch(batch, False)
                        out = reader(**inputs)
                        for b, (doc, start, end, _) in enumerate(best_spans(out.span_logits)):
                            text = span_text(mlm_tokenizer, inputs["input_ids"][b, doc], start, end)
                            exact.append(float(any(_normal(text) == _normal(a) for a in batch[b]["answers"])))
                return {"exact_match": exact, "curve": [(i, v) for i, v in enumerate(losses)][:: max(1, len(losses) // 50)]}

            with result.phase("open-domain QA"):
                outcome = units.get_or_run(f"qa/{condition}/seed{seed}", qa)
            result.runs("qa_exact_match", condition).add(seed, score=outcome["exact_match"])
            progress(f"  QA {condition}, seed {seed}: exact match {np.mean(outcome['exact_match']):.3f}")
    del readers

    result.metric_notes = {
        "masked_entity_accuracy": "every masked token of the held-out statement's target predicted (marginal over "
        "retrieved documents)",
        "masked_entity_nll": "-log p(target | statement), lower is better",
        **{f"statement_recall@{k}": f"subject's definition in the index's top {k} for the masked statement"
           for k in RECALL_AT},
        **{f"question_recall@{k}": f"subject's definition in the index's top {k} for the question" for k in RECALL_AT},
        "qa_exact_match": "open-domain QA exact match (normalised) on held-out questions",
    }  # fmt: skip
    for k in RECALL_AT:
        result.gains += [
            GainSpec(f"refreshed − stale index (statement recall@{k})", "refreshed", "stale", f"statement_recall@{k}"),
            GainSpec(f"trained − untrained (statement recall@{k})", "refreshed", "untrained",
                     f"statement_recall@{k}"),
        ]  # fmt: skip
    result.gains += [
        GainSpec("refreshed − stale index (question recall@5)", "refreshed", "stale", "question_recall@5"),
        GainSpec("refreshed − stale index (masked-entity accuracy)", "refreshed", "stale", "masked_entity_accuracy"),
        GainSpec("REALM − closed-book (masked-entity accuracy)", "refreshed", "closed_book", "masked_entity_accuracy"),
        GainSpec("REALM − closed-book (masked-entity NLL)", "refreshed", "closed_book", "masked_entity_nll"),
        GainSpec("reader − closed-book (QA exact match)", "reader_trained_retriever", "closed_book_reader",
                 "qa_exact_match"),
        GainSpec("trained − untrained retriever (QA exact match)", "reader_trained_retriever",
                 "reader_untrained_retriever", "qa_exact_match"),
    ]  # fmt: skip
    return result


def _normal(text: str) -> str:
    return " ".join(text.lower().replace(" ,", ",").split())


def _epochs(settings: RealmSettings, rows: int) -> float:
    return max(1.0, settings.steps * settings.batch_size / max(rows, 1))


def _add_recall(result: ExperimentResult, condition: str, seed: int, outcome: dict[str, Any]) -> None:
    for kind in ("statement", "question"):
        for k in RECALL_AT:
            result.runs(f"{kind}_recall@{k}", condition).add(seed, score=outcome[f"{kind}_recall@{k}"])
    curve = {str(k): float(np.mean(outcome[f"statement_recall@{k}"])) for k in RECALL_AT}
    result.curves.setdefault("recall_at_k", {}).setdefault(condition, {})[str(seed)] = curve


def _add_mlm(result: ExperimentResult, condition: str, seed: int, outcome: dict[str, Any]) -> None:
    result.runs("masked_entity_accuracy", condition).add(seed, score=outcome["masked_entity_accuracy"])
    result.runs("masked_entity_nll", condition, higher_is_better=False).add(seed, score=outcome["masked_entity_nll"])


def _limit(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(0).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


__all__ = ["MLM_CONDITIONS", "QA_CONDITIONS", "RealmSettings", "run_realm", "statement"]
