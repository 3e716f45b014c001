"""PELT plug: slot embeddings, passthrough, positions, several entities, padding, K-Adapter models, fill-mask.

Tiny BERT and RoBERTa masked LMs (hidden 32) with hand-built tokenizers; the table is built from sums/counts
directly (so each expected vector is known) and, once, by build_entity_table over a two-line corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
)

import hf_kadapter as hk
from hf_kadapter.pelt.modeling_pelt import PELTModel, fill_mask, pelt_inputs_embeds, pelt_position_ids
from hf_kadapter.pelt.table import EntityLookupTable, EntityTableMismatchError, model_fingerprint
from hf_kadapter.pelt.tokenization_pelt import PELTTokenizer

torch.set_num_threads(1)

WORDS = [
    "mozart",
    "was",
    "born",
    "in",
    "salzburg",
    ".",
    "paris",
    "is",
    "the",
    "capital",
    "of",
    "france",
    "austria",
    "composer",
    "he",
    "visited",
    "(",
    ")",
    "and",
]
TEXT = "Mozart was born in Salzburg ."  # Mozart [0, 6), Salzburg [19, 27)
PAIR_TEXT = "Paris is the capital of France ."  # Paris [0, 5), France [24, 30)
ENTITIES = ["Q254", "Q34713", "Q90", "Q142"]  # Mozart, Salzburg, Paris, France
NAMES = {"Q254": "Mozart", "Q34713": "Salzburg", "Q90": "Paris", "Q142": "France"}
NORM = 7.0


def mention(text: str, surface: str, entity_id: str) -> dict:
    start = text.index(surface)
    return {"char_start": start, "char_end": start + len(surface), "entity_id": entity_id}


MENTIONS = [mention(TEXT, "Mozart", "Q254"), mention(TEXT, "Salzburg", "Q34713")]
PAIR_MENTIONS = [mention(PAIR_TEXT, "Paris", "Q90"), mention(PAIR_TEXT, "France", "Q142")]


# ----- tiny models and tokenizers ------------------------------------------------------------------------------
def bert_tokenizer(folder: Path) -> BertTokenizer:
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def roberta_tokenizer(folder: Path) -> RobertaTokenizerFast:
    """Byte-level BPE whose merges give whole words (a trained one would split unpredictably)."""
    pieces = [w for w in {word for text in (TEXT, PAIR_TEXT) for word in text.split()} if len(w) > 1]
    pieces = sorted({"Ġ" + w for w in pieces} | set(pieces) | {"Ġ(", "Ġ)", "Ġ."})
    alphabet = sorted(set("".join(pieces)) | set("abcdefghijklmnopqrstuvwxyz().") | {"Ġ"})
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *alphabet])}
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            if (piece[: end - 1], piece[end - 1]) not in merges:
                merges.append((piece[: end - 1], piece[end - 1]))
            vocab.setdefault(piece[:end], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def tiny_mlm(kind: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **shape)).eval()
    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=66, pad_token_id=1, **shape)
    return RobertaForMaskedLM(config).eval()


def make_table(model, entity_ids=ENTITIES, sums: torch.Tensor | None = None, seed: int = 0) -> EntityLookupTable:
    """A table as if built by `model`: random sums of several occurrences (so normalisation matters)."""
    hidden = model.config.hidden_size
    if sums is None:
        sums = torch.randn(len(entity_ids), hidden, generator=torch.Generator().manual_seed(seed)) * 3
    return EntityLookupTable(
        entity_ids=list(entity_ids),
        sums=sums.float().clone(),
        counts=torch.arange(2, 2 + len(entity_ids)),
        names=[NAMES.get(e, e) for e in entity_ids],
        aliases=[[] for _ in entity_ids],
        norm=NORM,
        metadata={
            "model_fingerprint": model_fingerprint(model),
            "model_name_or_path": f"tiny-{model.config.model_type}",
            "hidden_size": hidden,
            "model_type": model.config.model_type,
            "max_occurrences": 256,
            "seed": 0,
        },
    )


@pytest.fixture(scope="module", params=["bert", "roberta"])
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tokenizer = bert_tokenizer(folder) if request.param == "bert" else roberta_tokenizer(folder)
    model = tiny_mlm(request.param, len(tokenizer))
    table = make_table(model)
    return request.param, model, table, PELTTokenizer(tokenizer, table), tokenizer


def expected_vector(table: EntityLookupTable, entity_id: str, norm: float = NORM) -> torch.Tensor:
    row = table.sums[table.index(entity_id)]
    return row / row.norm() * norm


# ----- the plug -------------------------------------------------------------------------------------------------
def test_slot_embeddings_are_normalised_vectors_and_the_rest_word_embeddings(setup):
    _, model, table, pelt, tokenizer = setup
    enc = pelt(
        [TEXT, PAIR_TEXT, "he visited austria ."],
        entities=[MENTIONS, PAIR_MENTIONS, None],
        padding=True,
        return_tensors="pt",
    )
    assert enc["entity_positions"].shape == (3, 2)  # two entities in each of the first texts, none in the third
    assert enc["entity_positions"][2].tolist() == [-1, -1]
    embeds = pelt_inputs_embeds(model, table, enc["input_ids"], enc["entity_positions"], enc["entity_ids"])
    words = model.get_input_embeddings()(enc["input_ids"])
    slot = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    for b, (positions, rows) in enumerate(zip(enc["entity_positions"], enc["entity_ids"], strict=True)):
        for position, row in zip(positions.tolist(), rows.tolist(), strict=True):
            if position < 0:
                continue
            slot[b, position] = True
            assert enc["input_ids"][b, position] == tokenizer.mask_token_id
            entity_id = table.entity_ids[row]
            torch.testing.assert_close(embeds[b, position], expected_vector(table, entity_id))
            assert abs(embeds[b, position].norm().item() - NORM) < 1e-4
    assert slot.sum() == 4
    assert torch.equal(embeds[~slot], words[~slot])  # every other token (padding included) untouched
    # The slot ids follow the mentions: Mozart's slot comes first, then Salzburg's.
    assert [table.entity_ids[r] for r in enc["entity_ids"][0].tolist()] == ["Q254", "Q34713"]
    # Another norm at use time.
    other = pelt_inputs_embeds(model, table, enc["input_ids"], enc["entity_positions"], enc["entity_ids"], norm=2.0)
    b, p = 1, int(enc["entity_positions"][1, 1])
    torch.testing.assert_close(other[b, p], expected_vector(table, "Q142", 2.0))


def test_a_table_of_another_width_is_named(setup):
    """A table without fingerprint (or plugged with check=False) whose vectors do not fit the embeddings: the error
    names the table, not a shape mismatch inside index_put."""
    _, model, table, pelt, _ = setup
    narrow = EntityLookupTable(table.entity_ids, table.sums[:, :8].clone(), table.counts.clone(), norm=NORM)
    enc = pelt(TEXT, entities=MENTIONS, return_tensors="pt")
    with pytest.raises(EntityTableMismatchError, match="8 dimensions but the word embeddings"):
        pelt_inputs_embeds(model, narrow, enc["input_ids"], enc["entity_positions"], enc["entity_ids"])


def test_ragged_lists_and_multiple_choice_shapes(setup):
    _, model, table, pelt, _ = setup
    enc = pelt([TEXT, PAIR_TEXT], entities=[MENTIONS, PAIR_MENTIONS[:1]], padding=True)
    input_ids = torch.tensor(enc["input_ids"])
    from_lists = pelt_inputs_embeds(model, table, input_ids, enc["entity_positions"], enc["entity_ids"])
    tensors = pelt([TEXT, PAIR_TEXT], entities=[MENTIONS, PAIR_MENTIONS[:1]], padding=True, return_tensors="pt")
    assert tensors["entity_positions"][1].tolist()[1] == -1
    from_tensors = pelt_inputs_embeds(model, table, input_ids, tensors["entity_positions"], tensors["entity_ids"])
    assert torch.equal(from_lists, from_tensors)
    # [batch, choices, length] inputs (multiple choice) with [batch, choices, entities] slots.
    stacked = pelt_inputs_embeds(
        model, table, input_ids[None], tensors["entity_positions"][None], tensors["entity_ids"][None]
    )
    assert torch.equal(stacked[0], from_tensors)


def test_several_entities_and_padded_batch_match_single_runs(setup):
    kind, model, table, pelt, _ = setup
    plugged = PELTModel(model, table)
    texts, mentions = [TEXT, PAIR_TEXT, "he visited austria ."], [MENTIONS, PAIR_MENTIONS, []]
    batch = pelt(texts, entities=mentions, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # really padded
    with torch.no_grad():
        batched = plugged(**batch).logits
        for b, (text, found) in enumerate(zip(texts, mentions, strict=True)):
            single = pelt(text, entities=found, return_tensors="pt")
            alone = plugged(**single).logits[0]
            length = alone.shape[0]
            torch.testing.assert_close(batched[b, :length], alone, atol=1e-5, rtol=1e-5)


def test_no_entities_is_exactly_the_plain_model(setup):
    _, model, table, pelt, tokenizer = setup
    plugged = PELTModel(model, table)
    texts = [TEXT, "he visited austria ."]
    plain_enc = tokenizer(texts, padding=True, return_tensors="pt")
    enc = pelt(texts, padding=True, return_tensors="pt")  # no entities: passes through unchanged
    assert torch.equal(enc["input_ids"], plain_enc["input_ids"])
    assert enc["entity_positions"].shape == (2, 0)
    with torch.no_grad():
        expected = model(**plain_enc).logits
        assert torch.equal(plugged(**enc).logits, expected)
        assert torch.equal(plugged(plain_enc["input_ids"], plain_enc["attention_mask"]).logits, expected)
        none = torch.full((2, 3), -1)
        assert torch.equal(plugged(**plain_enc, entity_positions=none, entity_ids=none).logits, expected)


def test_positions_and_attention_match_the_plain_model(setup):
    """A slot whose vector IS the mask token's word embedding must give the plain model's output everywhere,
    with left padding too: position ids (RoBERTa's are padding-aware) and attention are those of input_ids."""
    kind, model, _, pelt, tokenizer = setup
    mask_embedding = model.get_input_embeddings().weight[tokenizer.mask_token_id].detach()
    table = make_table(model, sums=mask_embedding.expand(len(ENTITIES), -1))
    table.norm = float(mask_embedding.norm())
    pelt = PELTTokenizer(tokenizer, table)
    tokenizer.padding_side = "left"
    try:
        enc = pelt([TEXT, "Paris ."], entities=[MENTIONS, None], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    assert enc["attention_mask"][1, 0] == 0  # left padded
    plugged = PELTModel(model, table)
    plain = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**plain).logits
        torch.testing.assert_close(plugged(**enc).logits[real], expected[real], atol=1e-5, rtol=1e-5)
        position_ids = pelt_position_ids(model, enc["input_ids"])
        if kind == "roberta":
            # What RoBERTa does with input_ids (padding-aware) — and what inputs_embeds alone would get wrong.
            embeddings = model.roberta.embeddings
            assert torch.equal(position_ids, embeddings.create_position_ids_from_input_ids(enc["input_ids"], 1))
            embeds = pelt_inputs_embeds(model, table, enc["input_ids"], enc["entity_positions"], enc["entity_ids"])
            naive = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
            assert not torch.allclose(naive[1][real[1]], expected[1][real[1]], atol=1e-3)
        else:
            assert position_ids is None  # BERT's positions do not depend on the ids


def test_labels_and_gradients_flow(setup):
    _, model, table, pelt, tokenizer = setup
    enc = pelt(TEXT.replace("born", tokenizer.mask_token), entities=MENTIONS, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    real_mask = (enc["input_ids"] == tokenizer.mask_token_id).nonzero()[:, 1].tolist()
    real_mask = [p for p in real_mask if p not in enc["entity_positions"][0].tolist()]
    assert len(real_mask) == 1
    labels[0, real_mask[0]] = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" born")[-1])
    model.zero_grad()
    out = PELTModel(model, table)(**enc, labels=labels)
    out.loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert out.loss.item() > 0 and grad is not None and grad.abs().sum() > 0
    model.zero_grad()


def test_bad_slots_raise_clear_errors(setup):
    _, model, table, pelt, _ = setup
    enc = pelt(TEXT, entities=MENTIONS, return_tensors="pt")
    length = enc["input_ids"].shape[1]
    with pytest.raises(ValueError, match="outside the sequence length"):
        pelt_inputs_embeds(model, table, enc["input_ids"], torch.tensor([[length + 1]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="outside the table"):
        pelt_inputs_embeds(model, table, enc["input_ids"], torch.tensor([[1]]), torch.tensor([[len(table)]]))
    with pytest.raises(ValueError, match="same shape"):
        pelt_inputs_embeds(model, table, enc["input_ids"], torch.tensor([[1, 2]]), torch.tensor([[0]]))


def test_table_of_another_model_is_refused(setup):
    kind, model, _, _, tokenizer = setup
    other = tiny_mlm(kind, len(tokenizer), seed=1)
    with pytest.raises(EntityTableMismatchError):
        PELTModel(model, make_table(other))
    PELTModel(model, make_table(other), check=False)  # explicit override


# ----- K-Adapter models -----------------------------------------------------------------------------------------
def test_kadapter_model_and_head_accept_plugged_inputs(setup):
    kind, model, table, pelt, tokenizer = setup
    adapter = hk.KnowledgeAdapterConfig(tap_layers=[0, 1], hidden_size=16, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    kadapter = hk.KAdapterModel.from_base(model, adapters={"factual": adapter}).eval()
    table.check_model(kadapter)  # same base weights as the MLM that built the table
    plugged = PELTModel(kadapter, table)
    enc = pelt([TEXT, PAIR_TEXT], entities=[MENTIONS, PAIR_MENTIONS], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = plugged(**enc)
        # The base inside the K-Adapter model sees exactly what the plugged MLM's encoder sees.
        mlm_hidden = PELTModel(model, table)(**enc, output_hidden_states=True).hidden_states[-1]
    real = enc["attention_mask"].bool()
    assert out.last_hidden_state.shape == (*enc["input_ids"].shape, 32)
    torch.testing.assert_close(out.base_last_hidden_state[real], mlm_hidden[real], atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    head = hk.KAdapterForEntityTyping.from_base(model, adapters={"factual": adapter}, num_labels=3).eval()
    with torch.no_grad():
        logits = PELTModel(head, table)(**enc, head_entity_positions=torch.tensor([1, 1])).logits
    assert logits.shape == (2, 3)

    # Another base (other weights, same shapes): the table is refused.
    other = tiny_mlm(kind, len(tokenizer), seed=1)
    with pytest.raises(EntityTableMismatchError):
        table.check_model(hk.KAdapterModel.from_base(other, adapters={"factual": adapter}))


# ----- fill-mask --------------------------------------------------------------------------------------------------
def test_fill_mask_predicts_real_masks_only(setup):
    _, model, table, pelt, tokenizer = setup
    text = TEXT.replace("born", tokenizer.mask_token)  # "Mozart was <mask> in Salzburg ."
    with_slots = fill_mask(model, pelt, table, text, entities=MENTIONS, top_k=3)
    without = fill_mask(model, pelt, table, text, entities=MENTIONS, top_k=3, use_entities=False)
    assert len(with_slots) == 1 and len(without) == 1  # one real mask; the two slot tokens are not predicted
    assert len(with_slots[0]) == 3 and all(isinstance(t, str) and 0 < s <= 1 for t, s in with_slots[0])
    assert [s for _, s in with_slots[0]] == sorted((s for _, s in with_slots[0]), reverse=True)
    assert with_slots != without  # the entity vectors change the prediction
    # Batch, two masks, linking by name, a text with slots and no mask.
    texts = [f"{tokenizer.mask_token} was born in {tokenizer.mask_token} .", "Mozart visited Paris ."]
    results = fill_mask(model, pelt, table, texts, link=True, top_k=2)
    assert [len(r) for r in results] == [2, 0]
    plain = fill_mask(model, pelt, table, texts[0], top_k=2, use_entities=False)
    assert results[0] == plain  # no entities in the first text: the plain model's predictions
    # The model's mode is left as it was (eval here; train mode is restored too, and predictions use eval).
    assert not model.training
    model.train()
    try:
        assert fill_mask(model, pelt, table, texts[0], top_k=2, use_entities=False) == plain
        assert model.training
        assert PELTModel(model, table).training and not PELTModel(model.eval(), table).training
    finally:
        model.eval()


def test_table_built_by_build_entity_table_plugs_in(setup, tmp_path):
    """End to end with engineer A's builder: its vectors are what the slots get."""
    from hf_kadapter.pelt.build import build_entity_table

    _, model, _, _, tokenizer = setup
    records = [
        {"text": TEXT, "mentions": MENTIONS},
        {"text": PAIR_TEXT, "mentions": PAIR_MENTIONS},
        {"text": "he visited Paris and Salzburg .", "mentions": []},
    ]
    records[2]["mentions"] = [
        mention(records[2]["text"], "Paris", "Q90"),
        mention(records[2]["text"], "Salzburg", "Q34713"),
    ]
    table = build_entity_table(model, tokenizer, records, batch_size=4, entity_names=NAMES, progress=False)
    assert set(table.entity_ids) == set(ENTITIES)
    table.save_pretrained(tmp_path / "table")
    table = EntityLookupTable.from_pretrained(tmp_path / "table")
    pelt = PELTTokenizer(tokenizer, table)
    enc = pelt("he visited Paris .", link=True, return_tensors="pt")
    assert enc["entity_ids"].tolist() == [[table.index("Q90")]]
    embeds = pelt_inputs_embeds(model, table, enc["input_ids"], enc["entity_positions"], enc["entity_ids"])
    torch.testing.assert_close(embeds[0, int(enc["entity_positions"][0, 0])], expected_vector(table, "Q90"))
    with torch.no_grad():
        assert PELTModel(model, table)(**enc).logits.shape[:2] == enc["input_ids"].shape
