"""Open-domain QA reader after REALM / ORQA: span scoring over the top-k retrieved documents.

Each retrieved document z is read as "[CLS] question [SEP] title [SEP] text [SEP]" (the title as the retriever's
embedder reads it) by an encoder (any BERT-like `AutoModel`, or a K-Adapter model: its `last_hidden_state` is
used). A span (s, e) inside the document part (title or text, never across the separator),
at most `max_span_width` tokens long, gets the score S(s, e, z) = MLP([h_s; h_e]) (one hidden layer of
`span_hidden_size`, 256 in REALM, ReLU) plus the retrieval score f(x, z). All spans of all k documents share
one softmax (REALM's / ORQA's joint reader distribution p(span, z | x)), and the training loss is the marginal

    -log sum_{z, span : text(span) matches an answer} p(span, z | x).

Examples where no retrieved document contains an answer have no such span: REALM drops them. Here they are
masked out of the loss (`has_answer` says which), or `on_missing="raise"` raises instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..utils.hub import LIBRARY_NAME, HubMixin, card_is_ours, is_hub_id, model_card, pop_push_kwargs
from ..utils.io import WEIGHTS_PATTERNS, FolderCommit, reading_local
from ..utils.modeling import (
    build_inner_model,
    config_property,
    default_linear_init,
    eval_mode,
    keep_pretrained_weights,
    model_init_kwargs,
    reapply_freezing,
    source_name,
)
from .configuration_reader import OpenQAReaderConfig

NEG_INF = -1e9
logger = logging.getLogger(__name__)


def usable_positions(config: Any) -> int | None:
    """How many tokens a BERT-like model reads: max_position_embeddings, less RoBERTa's offset (its positions start
    after the padding index). None when the config does not say (then nothing is checked)."""
    base = getattr(config, "base_config", None)
    if getattr(config, "max_position_embeddings", None) is None and base is not None:
        config = base  # K-Adapter models keep the base's config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if any(name in str(getattr(config, "model_type", "")) for name in ("roberta", "camembert")):
        positions -= (getattr(config, "pad_token_id", None) or 1) + 1
    return positions


def _hidden_size(encoder: nn.Module) -> int:
    config = encoder.config
    base = getattr(config, "base_config", None)  # K-Adapter models keep the base's config
    if getattr(config, "hidden_size", None) is None and base is not None:
        return base.hidden_size
    return config.hidden_size


@dataclass
class ReaderOutput(ModelOutput):
    """loss: the marginal loss (None without `answer_mask`).

    span_logits: [B, k, L, W] joint logits S(s, s + w, z) + f(x, z) (NEG_INF where the span is invalid).
    has_answer: [B] bool, examples with a correct span (with `answer_mask`).
    """

    loss: torch.Tensor | None = None
    span_logits: torch.Tensor | None = None
    has_answer: torch.Tensor | None = None


class OpenQAReaderPreTrainedModel(HubMixin, PreTrainedModel):
    config_class = OpenQAReaderConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    accepts_loss_kwargs = False
    _hub_name = "This OpenQAReader"

    def _init_weights(self, module: nn.Module) -> None:
        """The span scorer starts from PyTorch's Linear init; the encoder initialises (or loads) its own weights."""
        default_linear_init(module)


class OpenQAReader(OpenQAReaderPreTrainedModel):
    """Span reader over k documents per question; `encoder(input_ids=..., inputs_embeds=...)` -> last_hidden_state.

    `OpenQAReader(encoder, span_hidden_size=256, max_span_width=10)` wraps a loaded encoder (any BERT-like model or
    a K-Adapter model); `OpenQAReader(config)` (what `from_pretrained` calls) builds it from `config.encoder_config`.
    detach_retrieval: when False (default) the loss also trains the retriever through f(x, z).
    """

    max_span_width = config_property()
    use_retrieval_score = config_property()
    detach_retrieval = config_property()

    def __init__(
        self,
        encoder: nn.Module | OpenQAReaderConfig,
        span_hidden_size: int = 256,
        max_span_width: int = 10,
        use_retrieval_score: bool = True,
        detach_retrieval: bool = False,
        span_layer_norm_eps: float | None = None,
    ):
        if isinstance(encoder, OpenQAReaderConfig):
            config = encoder
            encoder = build_inner_model(config.encoder_class, config.encoder_config, config.encoder_init_kwargs)
        else:
            config = OpenQAReaderConfig(
                encoder_config=encoder.config,
                encoder_class=type(encoder).__name__,
                encoder_init_kwargs=model_init_kwargs(encoder),
                encoder_name_or_path=source_name(encoder),
                span_hidden_size=span_hidden_size,
                max_span_width=max_span_width,
                use_retrieval_score=use_retrieval_score,
                detach_retrieval=detach_retrieval,
                span_layer_norm_eps=span_layer_norm_eps,
            )
            keep_pretrained_weights(encoder)
        super().__init__(config)
        self.encoder = encoder
        hidden = _hidden_size(encoder)
        # MLP([h_s; h_e]) = w . relu(A h_s + B h_e + b) + c, computed per width without materialising all pairs.
        self.start_projection = nn.Linear(hidden, config.span_hidden_size)
        self.end_projection = nn.Linear(hidden, config.span_hidden_size, bias=False)
        self.span_output = nn.Linear(config.span_hidden_size, 1)
        # REALM's reader normalises the span hidden layer (LayerNorm, eps 1e-3) before the output; off by default.
        eps = config.span_layer_norm_eps
        self.span_norm = nn.LayerNorm(config.span_hidden_size, eps=eps) if eps is not None else None
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """transformers' from_pretrained; a local folder is read after any interrupted save in it is finished."""
        with reading_local(pretrained_model_name_or_path):
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        reapply_freezing(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """transformers' save (encoder and span scorer in one safetensors file) plus a model card, as one folder
        commit (hf_kadapter.utils.io): a kill never leaves new weights beside an old config."""
        if not kwargs.get("is_main_process", True):
            return
        push = pop_push_kwargs(kwargs)
        with FolderCommit(save_directory, stale=WEIGHTS_PATTERNS) as staging:
            super().save_pretrained(staging, **kwargs)
            if card_is_ours(Path(save_directory) / "README.md"):
                (staging / "README.md").write_text(self._model_card(), encoding="utf-8")
        if push is not None:
            self.push_to_hub(push.pop("repo_id", None) or Path(save_directory).name, **push, **kwargs)

    def _hub_base(self) -> str | None:
        return self.config.encoder_name_or_path

    def _set_hub_base(self, name: str | None) -> None:
        self.config.encoder_name_or_path = name

    def _model_card(self) -> str:
        config = self.config
        return model_card(
            title="Open-domain QA reader (REALM / ORQA span scorer)",
            library_name=LIBRARY_NAME,
            base_model=config.encoder_name_or_path if is_hub_id(config.encoder_name_or_path) else None,
            tags=["question-answering", "open-domain-qa", "realm", LIBRARY_NAME],
            body=(
                f'A `{config.encoder_class}` reads "[CLS] question [SEP] title [SEP] text [SEP]" for each retrieved '
                "document; "
                f"every span of at most {config.max_span_width} tokens is scored by an MLP (hidden "
                f"{config.span_hidden_size}) over its start and end states"
                + (", plus the retrieval score f(x, z)" if config.use_retrieval_score else "")
                + ". All spans of all documents share one softmax."
            ),
            usage=(
                "from hf_kadapter import OpenQAReader, RealmStyleRetriever\n\n"
                'reader = OpenQAReader.from_pretrained("<this repo>")\n'
                'retriever = RealmStyleRetriever.from_pretrained("<a retriever repo>")\n'
                'answer, doc_id, score = reader.ask("a question", retriever, retriever.tokenizer)'
            ),
        )

    def predict(
        self, questions: Sequence[str], retriever: Any, tokenizer: Any, k: int = 5, max_length: int = 288
    ) -> list[tuple[str, str | None, float]]:
        """`predict(questions, retriever, self, tokenizer, k)`: (answer, document id, joint logit) per question."""
        return predict(questions, retriever, self, tokenizer, k=k, max_length=max_length)

    def ask(self, question: str, retriever: Any, tokenizer: Any, k: int = 5) -> tuple[str, Any, float]:
        """`ask(question, retriever, self, tokenizer, k)`: retrieve, read, return the best span."""
        return ask(question, retriever, self, tokenizer, k=k)

    def span_scores(self, hidden: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
        """hidden [N, L, H], doc_mask [N, L] -> [N, L, W] scores of span (s, s + w); NEG_INF if invalid."""
        n, length, _ = hidden.shape
        start, end = self.start_projection(hidden), self.end_projection(hidden)
        scores = hidden.new_full((n, length, self.max_span_width), NEG_INF)
        doc_mask = doc_mask.bool()
        running = doc_mask.clone()  # all tokens s .. s + w inside the document part
        for w in range(min(self.max_span_width, length)):
            if w > 0:
                running = running[:, :-1] & doc_mask[:, w:]
            span_hidden = torch.relu(start[:, : length - w] + end[:, w:])
            if self.span_norm is not None:
                span_hidden = self.span_norm(span_hidden)
            score = self.span_output(span_hidden).squeeze(-1)
            ok = running[:, : length - w]
            scores[:, : length - w, w] = torch.where(ok, score, scores.new_tensor(NEG_INF))
        return scores

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        retrieval_scores: torch.Tensor | None = None,
        doc_valid: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        on_missing: str = "mask",
        doc_truncated: torch.Tensor | None = None,
        **encoder_kwargs: Any,
    ) -> ReaderOutput:
        """Inputs are [B, k, L] ([B, k, L, H] for inputs_embeds); retrieval_scores / doc_valid [B, k];
        answer_mask [B, k, L, W] (from `prepare_reader_inputs`) gives the loss. `doc_truncated` (from
        prepare_reader_inputs) is informative only."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None or doc_mask is None:
            raise ValueError("OpenQAReader needs input_ids (or inputs_embeds) and doc_mask")
        batch, k, length = reference.shape[:3]
        if tuple(doc_mask.shape) != (batch, k, length):
            raise ValueError(
                f"doc_mask has shape {tuple(doc_mask.shape)} but the inputs are (batch, k, length) = {(batch, k, length)}: "
                "it marks the document tokens of these very inputs (build both with prepare_reader_inputs)."
            )
        positions = usable_positions(self.encoder.config)
        if positions is not None and length > positions:
            raise ValueError(
                f"The reader's inputs have {length} tokens but its encoder reads at most {positions}: build them with "
                f"prepare_reader_inputs(..., max_length={positions}) (documents are cut to fit, questions never)."
            )

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.reshape(batch * k, *x.shape[2:])

        kwargs = {"attention_mask": flat(attention_mask), **encoder_kwargs}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = flat(token_type_ids)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = flat(inputs_embeds)
        else:
            kwargs["input_ids"] = flat(input_ids)
        hidden = self.encoder(**kwargs).last_hidden_state
        logits = self.span_scores(hidden, flat(doc_mask)).view(batch, k, length, self.max_span_width)
        docs_ok = torch.ones(batch, k, dtype=torch.bool, device=logits.device) if doc_valid is None else doc_valid
        if retrieval_scores is not None:
            docs_ok = docs_ok & torch.isfinite(retrieval_scores)
            if self.use_retrieval_score:
                rs = retrieval_scores.detach() if self.detach_retrieval else retrieval_scores
                rs = torch.where(docs_ok, rs, torch.zeros_like(rs)).to(logits.dtype)
                logits = logits + rs[:, :, None, None]
        logits = torch.where(docs_ok[:, :, None, None] & (logits > NEG_INF / 2), logits, logits.new_tensor(NEG_INF))
        if answer_mask is None:
            return ReaderOutput(span_logits=logits)
        if tuple(answer_mask.shape) != tuple(logits.shape):
            raise ValueError(
                f"answer_mask has shape {tuple(answer_mask.shape)} but the reader scores spans of shape "
                f"{tuple(logits.shape)} (batch, k, length, max_span_width={self.max_span_width}): build the "
                "inputs with prepare_reader_inputs(..., max_span_width=reader.max_span_width)."
            )
        loss, has_answer = marginal_loss(logits, answer_mask, on_missing=on_missing)
        return ReaderOutput(loss=loss, span_logits=logits, has_answer=has_answer)


def marginal_loss(
    span_logits: torch.Tensor, answer_mask: torch.Tensor, on_missing: str = "mask"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sum_{correct (z, span)} p(span, z | x), the softmax over all spans of all k documents jointly.

    span_logits, answer_mask: [B, k, L, W] (any [B, ...] works). Examples without a correct span (no retrieved
    document contains the answer) are dropped from the mean, as in REALM; `has_answer` [B] says which were kept.
    on_missing="raise" raises ValueError instead. If no example has an answer the loss is 0 (still a graph).
    Returns (loss, has_answer).
    """
    if on_missing not in ("mask", "raise"):
        raise ValueError(f"on_missing must be 'mask' or 'raise', got {on_missing!r}")
    flat_logits = span_logits.reshape(span_logits.shape[0], -1)
    correct = answer_mask.reshape(answer_mask.shape[0], -1).bool() & (flat_logits > NEG_INF / 2)
    has_answer = correct.any(dim=1)
    if on_missing == "raise" and not bool(has_answer.all()):
        missing = (~has_answer).nonzero().flatten().tolist()
        raise ValueError(f"examples {missing} have no retrieved document containing the answer")
    log_total = torch.logsumexp(flat_logits, dim=1)
    log_correct = torch.logsumexp(flat_logits.masked_fill(~correct, NEG_INF), dim=1)
    losses = (log_total - log_correct)[has_answer]
    if losses.numel() == 0:
        return flat_logits.sum() * 0.0, has_answer
    return losses.mean(), has_answer


def _answer_token_ids(tokenizer: Any, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def prepare_reader_inputs(
    tokenizer: Any,
    questions: Sequence[str],
    documents: Sequence[Sequence[str | None]],
    answers: Sequence[Sequence[str] | str | None] | None = None,
    max_length: int = 288,
    max_span_width: int = 10,
    whole_words: bool = True,
    titles: Sequence[Sequence[str | None]] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise "[CLS] question [SEP] title [SEP] text [SEP]" for each of the k documents of each question.

    documents: [B][k] texts (None for padding, e.g. RetrievalOutput.texts); titles: [B][k] titles (e.g.
    RetrievalOutput.titles), read before the text and separated from it by the tokenizer's separator, as the
    retriever's embedder reads "title [SEP] text" (an empty or None title adds nothing). Answers can be found in the
    title too, never across the separator. Only the document side is truncated to `max_length`: `doc_truncated`
    [B, k] says which documents were cut (and how many is logged); a question that leaves no room for a document is
    refused. Returns input_ids, attention_mask, token_type_ids, doc_mask (title and text tokens, no [SEP]/[PAD])
    [B, k, L], doc_valid [B, k], doc_truncated [B, k], and with `answers` answer_mask [B, k, L, W]: spans whose token
    ids equal a tokenised answer (answers are matched on the tokenizer's normalised tokens, so "Paris" matches
    "paris" with an uncased tokenizer). `whole_words`: a match must not start or end inside a word (WordPiece "##"
    continuation tokens), so "pa" does not match the start of "paris"; other subword schemes are matched on tokens
    only.
    """
    batch, k = len(questions), len(documents[0])
    if any(len(docs) != k for docs in documents):
        raise ValueError("every question needs the same number of documents (pad with None)")
    if titles is not None and [len(t) for t in titles] != [len(d) for d in documents]:
        raise ValueError("titles must have the same [B][k] shape as documents (None where there is no title)")
    firsts = [q for q in questions for _ in range(k)]
    seconds = [d or "" for docs in documents for d in docs]
    if titles is not None:
        separator = tokenizer.sep_token or tokenizer.eos_token
        if separator is None:
            raise ValueError(f"{type(tokenizer).__name__} has no sep (or eos) token to put between title and text.")
        flat_titles = [t for row in titles for t in row]
        seconds = [f"{t} {separator} {d}" if t else d for t, d in zip(flat_titles, seconds, strict=True)]
    doc_truncated = _check_pair_lengths(tokenizer, questions, firsts, seconds, max_length)
    enc = tokenizer(
        firsts,
        seconds,
        padding=True,
        truncation="only_second",
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    input_ids, types = enc["input_ids"], enc["token_type_ids"]
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    doc_mask = (types == 1) & enc["attention_mask"].bool() & ~special
    length = input_ids.shape[1]
    out = {
        "input_ids": input_ids.view(batch, k, length),
        "attention_mask": enc["attention_mask"].view(batch, k, length),
        "token_type_ids": types.view(batch, k, length),
        "doc_mask": doc_mask.view(batch, k, length),
        "doc_valid": torch.tensor([[d is not None for d in docs] for docs in documents], dtype=torch.bool),
        "doc_truncated": doc_truncated.view(batch, k),
    }
    if answers is not None:
        mask = torch.zeros(batch * k, length, max_span_width, dtype=torch.bool)
        for row in range(batch * k):
            gold = answers[row // k]
            gold = [] if gold is None else [gold] if isinstance(gold, str) else list(gold)
            ids, inside = input_ids[row].tolist(), doc_mask[row].tolist()
            pieces = tokenizer.convert_ids_to_tokens(ids) if whole_words else None
            for answer in gold:
                target = _answer_token_ids(tokenizer, answer)
                width = len(target)
                if not 0 < width <= max_span_width:
                    continue
                for s in range(length - width + 1):
                    if ids[s : s + width] != target or not all(inside[s : s + width]):
                        continue
                    if pieces is not None and (
                        str(pieces[s]).startswith("##")
                        or (s + width < length and str(pieces[s + width]).startswith("##"))
                    ):
                        continue
                    mask[row, s, width - 1] = True
        out["answer_mask"] = mask.view(batch, k, length, max_span_width)
    return out


def _check_pair_lengths(
    tokenizer: Any, questions: Sequence[str], firsts: list[str], seconds: list[str], max_length: int
) -> torch.Tensor:
    """Which (question, document) pairs exceed `max_length` (their documents get cut, and the count is logged); a
    question too long to leave room for one document token is refused."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    question_lengths = [len(ids) for ids in tokenizer(list(questions), add_special_tokens=False)["input_ids"]]
    longest = max(question_lengths, default=0)
    if longest + special >= max_length:
        row = question_lengths.index(longest)
        raise ValueError(
            f"Question {row} has {longest} tokens: with the {special} special tokens it leaves no room for a document "
            f"in max_length={max_length}. Shorten the question or raise max_length (within the encoder's positions)."
        )
    k = len(firsts) // max(len(questions), 1)
    doc_lengths = [len(ids) for ids in tokenizer(seconds, add_special_tokens=False)["input_ids"]]
    truncated = torch.tensor(
        [question_lengths[i // k] + d + special > max_length for i, d in enumerate(doc_lengths)], dtype=torch.bool
    )
    if bool(truncated.any()):
        logger.warning(
            "%d of %d question + document pairs are longer than max_length=%d: their documents were cut.",
            int(truncated.sum()), len(truncated), max_length,
        )  # fmt: skip
    return truncated


def best_spans(span_logits: torch.Tensor) -> list[tuple[int, int, int, float]]:
    """Per question, the highest-scoring (doc index, start, end (inclusive), joint logit)."""
    batch, k, length, width = span_logits.shape
    values, flat = span_logits.reshape(batch, -1).max(dim=1)
    results = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        doc, rest = divmod(index, length * width)
        start, w = divmod(rest, width)
        results.append((doc, start, start + w, value))
    return results


def span_text(tokenizer: Any, input_ids: torch.Tensor, start: int, end: int) -> str:
    return tokenizer.decode(input_ids[start : end + 1].tolist(), skip_special_tokens=True).strip()


@torch.no_grad()
def predict(
    questions: Sequence[str],
    retriever: Any,
    reader: OpenQAReader,
    tokenizer: Any,
    k: int = 5,
    max_length: int = 288,
) -> list[tuple[str, str | None, float]]:
    """(answer text, document id, joint logit) per question: retrieve top-k, read, take the best span."""
    # No dropout while answering (one question must get one answer); the caller's modes come back afterwards.
    with eval_mode(reader, getattr(retriever, "embedder", None)):
        retrieval = retriever.retrieve(list(questions), k=k)
        inputs = prepare_reader_inputs(
            tokenizer,
            questions,
            retrieval.texts,
            max_length=max_length,
            max_span_width=reader.max_span_width,
            titles=retrieval.titles,
        )
        device = next(reader.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        out = reader(**inputs, retrieval_scores=retrieval.scores.to(device))
    answers = []
    for b, (doc, start, end, score) in enumerate(best_spans(out.span_logits)):
        text = span_text(tokenizer, inputs["input_ids"][b, doc], start, end)
        answers.append((text, retrieval.doc_ids[b][doc], score))
    return answers


def ask(question: str, retriever: Any, reader: OpenQAReader, tokenizer: Any, k: int = 5) -> tuple[str, Any, float]:
    """End to end: (answer text, id of the document it came from, joint logit of the span)."""
    return predict([question], retriever, reader, tokenizer, k=k)[0]


def evaluate_open_qa(
    questions: Sequence[str],
    answers: Sequence[Sequence[str] | str],
    retriever: Any,
    reader: OpenQAReader,
    tokenizer: Any,
    k: int = 5,
) -> dict[str, float]:
    """SQuAD exact match / F1 (the package's "squad_em_f1" metric) of `predict` against gold answers."""
    from hf_kadapter.kadapter.metrics import load_metric

    predictions = predict(questions, retriever, reader, tokenizer, k=k)
    metric = load_metric("squad_em_f1", keep_in_memory=True)
    result = metric.compute(
        predictions=[{"id": str(i), "prediction_text": p[0]} for i, p in enumerate(predictions)],
        references=[
            {"id": str(i), "answers": {"text": [a] if isinstance(a, str) else list(a)}} for i, a in enumerate(answers)
        ],
    )
    return {key: float(value) for key, value in result.items()}


__all__ = [
    "OpenQAReader",
    "OpenQAReaderPreTrainedModel",
    "ReaderOutput",
    "ask",
    "best_spans",
    "evaluate_open_qa",
    "marginal_loss",
    "predict",
    "prepare_reader_inputs",
]
