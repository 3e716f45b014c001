"""PELT tokenizer hook and alias linker: slot groups token by token for BERT WordPiece and RoBERTa byte-level BPE,
pairs, padded batches, truncation at every cut point, unknown entities, pass-through, linking, save/load."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertTokenizer, RobertaTokenizer

from hf_kadapter.pelt.tokenization_pelt import AliasLinker, PELTEncoding, PELTTokenizer

torch.set_num_threads(1)

BERT_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")", ".", "bar", "##ack", "obama", "was", "born", "in",
    "hon", "##olu", "##lu", "paris", "is", "the", "capital", "of", "france", "he", "visited", "<e>",
]  # fmt: skip
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
ROBERTA_PIECES = [
    "Bar", "ack", "ĠObama", "Ġ(", "Ġ)", "Ġwas", "Ġborn", "Ġin", "ĠHon", "olulu", "Paris", "ĠParis", "Ġis", "Ġthe",
    "Ġcapital", "Ġof", "ĠFrance", "He", "Ġvisited",
]  # fmt: skip

SENTENCE = "Barack Obama was born in Honolulu."
OBAMA = {"char_start": 0, "char_end": 12, "entity_id": "Q76"}  # "Barack Obama": three subwords in both tokenizers
HONOLULU = {"char_start": 25, "char_end": 33, "entity_id": "Q18094"}
PAIR = "Paris is the capital of France."
PARIS = {"char_start": 0, "char_end": 5, "entity_id": "Q90"}
FRANCE = {"char_start": 24, "char_end": 30, "entity_id": "Q142"}
ENTITY_VOCAB = ["Q90", "Q76", "Q18094", "Q142"]  # rows: Q90 -> 0, Q76 -> 1, Q18094 -> 2, Q142 -> 3


def bert_tokenizer(folder: Path) -> BertTokenizer:
    path = folder / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return BertTokenizer(vocab=str(path))


def roberta_tokenizer(folder: Path, extra_pieces: tuple[str, ...] = (), **kwargs) -> RobertaTokenizer:
    """A byte-level BPE with hand-written merges (so the expected subwords are exact), add_prefix_space=False
    as RoBERTa checkpoints ship."""
    vocab = {token: i for i, token in enumerate(ROBERTA_SPECIALS)}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    merges: list[str] = []
    for piece in [*ROBERTA_PIECES, *extra_pieces]:
        current = piece[0]
        for char in piece[1:]:
            if f"{current} {char}" not in merges:
                merges.append(f"{current} {char}")
            current += char
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), **kwargs)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> BertTokenizer:
    return bert_tokenizer(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> RobertaTokenizer:
    return roberta_tokenizer(tmp_path_factory.mktemp("roberta"))


@pytest.fixture(params=["bert", "roberta"])
def tokenizer(request, bert, roberta):
    return bert if request.param == "bert" else roberta


def tokens(pelt: PELTTokenizer, ids) -> list[str]:
    return pelt.convert_ids_to_tokens(list(ids))


class FakeTable:
    """Duck-typed stand-in for EntityLookupTable (entity_ids, names, aliases, counts, index)."""

    def __init__(self, entity_ids, names, aliases, counts) -> None:
        self.entity_ids, self.names, self.aliases = list(entity_ids), list(names), list(aliases)
        self.counts = torch.tensor(counts, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.entity_ids)

    def __contains__(self, entity_id) -> bool:
        return entity_id in self.entity_ids

    def index(self, entity_id: str) -> int:
        if entity_id not in self.entity_ids:
            raise KeyError(f"unknown entity {entity_id!r}")
        return self.entity_ids.index(entity_id)


# ----- the hook token by token -----------------------------------------------------------------------------------
def test_bert_token_by_token(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[HONOLULU, OBAMA])  # order of the mentions does not matter
    assert tokens(pelt, enc["input_ids"]) == [
        "[CLS]", "bar", "##ack", "obama", "(", "[MASK]", ")", "was", "born", "in", "hon", "##olu", "##lu",
        "(", "[MASK]", ")", ".", "[SEP]",
    ]  # fmt: skip
    assert enc["entity_positions"] == [5, 14]
    assert enc["entity_ids"] == [1, 2]
    assert enc["token_type_ids"] == [0] * 18 and enc["attention_mask"] == [1] * 18
    assert isinstance(enc, PELTEncoding) and enc.unknown_entities == 0 and enc.truncated_entities == 0
    assert "unknown_entities" not in enc  # attribute, not a key: model(**enc) never receives it
    assert pelt.rewrite(SENTENCE, [OBAMA, HONOLULU]) == "Barack Obama ([MASK] ) was born in Honolulu ([MASK] )."


def test_roberta_token_by_token(roberta):
    pelt = PELTTokenizer(roberta, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU])
    assert tokens(pelt, enc["input_ids"]) == [
        "<s>", "Bar", "ack", "ĠObama", "Ġ(", "<mask>", "Ġ)", "Ġwas", "Ġborn", "Ġin", "ĠHon", "olulu",
        "Ġ(", "<mask>", "Ġ)", ".", "</s>",
    ]  # fmt: skip
    assert enc["entity_positions"] == [5, 13]
    assert enc["entity_ids"] == [1, 2]
    assert "token_type_ids" not in enc


def test_output_is_the_wrapped_tokenizer_on_the_rewritten_text(tokenizer):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU])
    plain = tokenizer(pelt.rewrite(SENTENCE, [OBAMA, HONOLULU]))
    assert {k: enc[k] for k in plain} == dict(plain)
    assert all(enc["input_ids"][p] == pelt.mask_token_id for p in enc["entity_positions"])


def test_mask_token_with_lstrip_still_one_slot(tmp_path):
    """Real RoBERTa checkpoints give <mask> lstrip=True; the slot after "(" must still be found."""
    tokenizer = roberta_tokenizer(tmp_path, mask_token=AddedToken("<mask>", lstrip=True, special=True))
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA])
    assert tokens(pelt, enc["input_ids"])[3:8] == ["ĠObama", "Ġ(", "<mask>", "Ġ)", "Ġwas"]
    assert enc["entity_positions"] == [5]


def test_real_masks_are_not_slots(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    text = "Barack Obama was born in [MASK]."
    enc = pelt(text, entities=[OBAMA])
    masks = [i for i, t in enumerate(enc["input_ids"]) if t == bert.mask_token_id]
    assert masks == [5, 10] and enc["entity_positions"] == [5]


def test_custom_slot_token_and_bad_slot(tmp_path):
    tokenizer = bert_tokenizer(tmp_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<e>"]})
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB, slot_token="<e>")
    enc = pelt(SENTENCE, entities=[OBAMA])
    assert tokens(pelt, enc["input_ids"])[3:7] == ["obama", "(", "<e>", ")"]
    assert enc["entity_positions"] == [5]
    with pytest.raises(ValueError, match="not a single token"):
        PELTTokenizer(bert_tokenizer(tmp_path), slot_token="<slot>")


# ----- offsets, words and characters on the caller's text ---------------------------------------------------------
def test_offsets_words_and_chars_refer_to_the_original_text(tokenizer):
    """Tokens of the text keep their offsets and words in the ORIGINAL text; inserted tokens are like specials."""
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU], return_offsets_mapping=True)
    plain = tokenizer(SENTENCE, return_offsets_mapping=True)
    inserted = {p + d for p in enc["entity_positions"] for d in (-1, 0, 1)}
    kept = [t for t in range(len(enc["input_ids"])) if t not in inserted]
    # without the inserted tokens, the encoding is the plain one of the original text, offsets and words included
    assert [enc["input_ids"][t] for t in kept] == plain["input_ids"]
    assert [enc["offset_mapping"][t] for t in kept] == plain["offset_mapping"]
    assert [enc.word_ids()[t] for t in kept] == plain.word_ids()
    for t in inserted:
        assert enc["offset_mapping"][t] == (0, 0) and enc.word_ids()[t] is None and enc.token_to_chars(t) is None
    for c in range(len(SENTENCE)):
        assert enc.char_to_token(c) == (None if plain.char_to_token(c) is None else kept[plain.char_to_token(c)])
        assert enc.char_to_word(c) == plain.char_to_word(c)
    for word in range(max(w for w in plain.word_ids() if w is not None) + 1):
        assert enc.word_to_chars(word) == plain.word_to_chars(word)
        first, last = plain.word_to_tokens(word)
        assert tuple(enc.word_to_tokens(word)) == (kept[first], kept[last - 1] + 1)
    assert enc.char_to_token(len(SENTENCE)) is None and enc.char_to_token(-1) is None


def test_label_spans_on_the_original_text_land_on_the_right_tokens(tokenizer):
    """NER-style alignment: spans given on the caller's text, labels set through char_to_token, in a pair and a
    left-padded batch."""
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    spans = {"PER": (0, 12), "LOC": (25, 33)}  # "Barack Obama", "Honolulu"
    enc = pelt(["He visited Paris.", SENTENCE], [PAIR, PAIR], entities=[None, [OBAMA, HONOLULU]],
               entities_pair=[[PARIS], [FRANCE]], padding=True, padding_side="left")  # fmt: skip
    tokens_of = {}
    for label, (start, end) in spans.items():
        tokens_of[label] = sorted({enc.char_to_token(1, c) for c in range(start, end)} - {None})
    words = tokens(pelt, enc["input_ids"][1])
    assert [words[t] for t in tokens_of["PER"]] in (["bar", "##ack", "obama"], ["Bar", "ack", "ĠObama"])
    assert [words[t] for t in tokens_of["LOC"]] in (["hon", "##olu", "##lu"], ["ĠHon", "olulu"])
    # the slots sit right after the labelled tokens, and are labelled nothing
    assert enc["entity_positions"][1][:2] == [tokens_of["PER"][-1] + 2, tokens_of["LOC"][-1] + 2]
    france = enc.char_to_token(1, 24, sequence_index=1)
    assert words[france].lstrip("Ġ").lower() == "france" and enc["entity_positions"][1][2] == france + 2
    assert enc.token_to_chars(1, france) == (24, 30)


def test_a_token_mixing_inserted_and_original_characters_keeps_the_original_ones(tmp_path):
    """Byte-level BPE pre-tokenizes " )." as one unit; with a "Ġ)." merge the group's ")" and the sentence's "."
    are one token: it maps to the "." (and its word stays), and the group still counts as whole."""
    tokenizer = roberta_tokenizer(tmp_path, extra_pieces=("Ġ).",))
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[HONOLULU], return_offsets_mapping=True)
    toks = tokens(pelt, enc["input_ids"])
    assert toks[-4:] == ["Ġ(", "<mask>", "Ġ).", "</s>"] and enc["entity_positions"] == [len(toks) - 3]
    assert enc["offset_mapping"][-2] == (33, 34) and enc.char_to_token(33) == len(toks) - 2
    plain = tokenizer(SENTENCE)
    assert enc.word_ids()[-2] == plain.word_ids()[-2] == 6
    assert enc.word_to_tokens(6) == (len(toks) - 2, len(toks) - 1)


def test_offsets_under_truncation_and_as_tensors(tokenizer):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt([SENTENCE, PAIR], entities=[[OBAMA, HONOLULU], [PARIS, FRANCE]], truncation=True, max_length=9,
               padding="max_length", return_offsets_mapping=True, return_tensors="pt")  # fmt: skip
    assert enc["offset_mapping"].shape == (2, 9, 2)
    for b, text in enumerate([SENTENCE, PAIR]):
        for t, (start, end) in enumerate(enc["offset_mapping"][b].tolist()):
            if enc.word_ids(b)[t] is not None:
                assert 0 <= start < end <= len(text)
                assert enc.char_to_token(b, start) == t
                token = pelt.convert_ids_to_tokens(int(enc["input_ids"][b, t]))
                assert token.removeprefix("##").removeprefix("Ġ").lower() == text[start:end].lower()
    assert enc["offset_mapping"][0, 3].tolist() == [7, 12]  # "Obama", slot group after it


def test_encoding_pickles_with_its_mapping(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA])
    restored = pickle.loads(pickle.dumps(enc))
    assert restored.word_ids() == enc.word_ids() and restored.char_to_token(13) == enc.char_to_token(13) == 7
    assert restored.encodings[0].rewritten_texts == ("Barack Obama ([MASK] ) was born in Honolulu.",)


# ----- pairs and batches -----------------------------------------------------------------------------------------
def test_pair(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    enc = pelt("He visited Paris.", PAIR, entities=[], entities_pair=[FRANCE, PARIS])
    assert tokens(pelt, enc["input_ids"]) == [
        "[CLS]", "he", "visited", "paris", ".", "[SEP]",
        "paris", "(", "[MASK]", ")", "is", "the", "capital", "of", "france", "(", "[MASK]", ")", ".", "[SEP]",
    ]  # fmt: skip
    assert enc["entity_positions"] == [8, 16] and enc["entity_ids"] == [0, 3]
    assert enc["token_type_ids"] == [0] * 6 + [1] * 14
    # entities in both segments
    both = pelt("He visited Paris.", PAIR, entities=[{"char_start": 11, "char_end": 16, "entity_id": "Q90"}],
                entities_pair=[FRANCE])  # fmt: skip
    assert tokens(pelt, both["input_ids"])[3:7] == ["paris", "(", "[MASK]", ")"]
    assert both["entity_positions"] == [5, 16] and both["entity_ids"] == [0, 3]


def test_roberta_pair(roberta):
    pelt = PELTTokenizer(roberta, ENTITY_VOCAB)
    enc = pelt(SENTENCE, PAIR, entities=[OBAMA], entities_pair=[PARIS])
    toks = tokens(pelt, enc["input_ids"])
    assert toks[:7] == ["<s>", "Bar", "ack", "ĠObama", "Ġ(", "<mask>", "Ġ)"]
    second = toks.index("</s>") + 2  # RoBERTa pairs: </s></s>
    assert toks[second : second + 4] == ["Paris", "Ġ(", "<mask>", "Ġ)"]
    assert enc["entity_positions"] == [5, second + 2] and enc["entity_ids"] == [1, 0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_as_tensors(tokenizer, side):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    texts = [SENTENCE, "Paris.", "He was born."]
    entities = [[OBAMA, HONOLULU], [PARIS], None]
    enc = pelt(texts, entities=entities, padding=True, return_tensors="pt", padding_side=side)
    plain = tokenizer([pelt.rewrite(t, e) for t, e in zip(texts, entities, strict=True)], padding=True,
                      return_tensors="pt", padding_side=side)  # fmt: skip
    for key in plain:
        assert torch.equal(enc[key], plain[key]), key
    positions, rows = enc["entity_positions"], enc["entity_ids"]
    assert positions.dtype == rows.dtype == torch.long and positions.shape == rows.shape == (3, 2)
    assert rows.tolist() == [[1, 2], [0, -1], [-1, -1]]
    assert (positions[1:, 1] == -1).all() and (positions[2] == -1).all()
    for b, p in zip(*torch.nonzero(positions >= 0, as_tuple=True), strict=True):
        assert enc["input_ids"][b, positions[b, p]] == pelt.mask_token_id
        assert enc["attention_mask"][b, positions[b, p]] == 1
    if side == "left":
        assert positions[1, 0] > positions[0, 0]  # shifted by the left padding
    assert enc.unknown_entities == [0, 0, 0] and enc.to("cpu") is enc
    restored = pickle.loads(pickle.dumps(enc))
    assert restored.unknown_entities == [0, 0, 0] and torch.equal(restored["entity_ids"], rows)


def test_batch_as_lists_and_empty_tensors(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    enc = pelt([SENTENCE, "Paris."], entities=[[OBAMA], [PARIS]])
    assert enc["entity_positions"] == [[5], [3]] and enc["entity_ids"] == [[1], [0]]
    none = pelt(["Paris.", "He was born."], padding=True, return_tensors="pt")
    assert none["entity_positions"].shape == (2, 0) and none["entity_positions"].dtype == torch.long
    single = pelt(SENTENCE, entities=[OBAMA], return_tensors="pt")
    assert single["input_ids"].shape[0] == 1 and single["entity_positions"].tolist() == [[5]]


# ----- truncation --------------------------------------------------------------------------------------------------
def check_whole_groups(pelt: PELTTokenizer, enc, texts, pairs, entities, entities_pair, **call) -> None:
    """Every '(' has its slot and ')'; positions are exactly the slots; the output is the wrapped tokenizer's own
    truncation of the text rewritten with SOME subset of the groups."""
    ids = enc["input_ids"]
    toks = tokens(pelt, ids)
    opens = [i for i, t in enumerate(toks) if t.lstrip("Ġ") == "("]
    closes = [i for i, t in enumerate(toks) if t.lstrip("Ġ") == ")"]
    slots = [i for i, t in enumerate(ids) if t == pelt.slot_token_id]
    assert slots == enc["entity_positions"]
    assert opens == [p - 1 for p in slots] and closes == [p + 1 for p in slots], toks
    known = len(entities) + len(entities_pair)
    assert len(slots) + enc.truncated_entities == known
    subsets = []
    for keep in itertools.product([False, True], repeat=known):
        first = [e for e, k in zip(entities, keep, strict=False) if k]
        second = [e for e, k in zip(entities_pair, keep[len(entities) :], strict=True) if k]
        rewritten = pelt.rewrite(texts, first)
        rewritten_pair = pelt.rewrite(pairs, second) if pairs is not None else None
        subsets.append(pelt.tokenizer(rewritten, rewritten_pair, **call)["input_ids"])
    assert ids in subsets


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first"])
def test_truncation_single_every_cut_point(tokenizer, truncation):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    full = len(pelt(SENTENCE, entities=[OBAMA, HONOLULU])["input_ids"])
    previous = 0
    for max_length in range(2, full + 2):
        call = dict(truncation=truncation, max_length=max_length)
        enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU], **call)
        assert len(enc["input_ids"]) <= max_length
        check_whole_groups(pelt, enc, SENTENCE, None, [OBAMA, HONOLULU], [], **call)
        assert len(enc["entity_positions"]) >= previous  # more room never loses a slot
        previous = len(enc["entity_positions"])
    assert previous == 2


def test_truncation_cut_inside_a_group_drops_it(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    pelt.reset_stats()
    # the full output is [CLS] bar ##ack obama ( [MASK] ) ...: max_length=6 would end on "("
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU], truncation=True, max_length=6)
    assert tokens(pelt, enc["input_ids"]) == ["[CLS]", "bar", "##ack", "obama", "was", "[SEP]"]
    assert enc["entity_positions"] == [] and enc.truncated_entities == 2
    assert pelt.stats["truncated_entities"] == 2 and pelt.stats["slots"] == 0
    # ending on the slot (before ")"): dropped too
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU], truncation=True, max_length=16)
    assert tokens(pelt, enc["input_ids"])[-4:] == ["##olu", "##lu", ".", "[SEP]"]
    assert enc["entity_positions"] == [5] and enc.truncated_entities == 1


def test_truncation_left_side(bert):
    left = copy.deepcopy(bert)
    left.truncation_side = "left"
    pelt = PELTTokenizer(left, ENTITY_VOCAB)
    for max_length in range(2, 20):
        call = dict(truncation=True, max_length=max_length)
        enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU], **call)
        check_whole_groups(pelt, enc, SENTENCE, None, [OBAMA, HONOLULU], [], **call)


@pytest.mark.parametrize("truncation", ["longest_first", "only_first", "only_second"])
def test_truncation_pairs_every_cut_point(tokenizer, truncation):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    first, second = [OBAMA, HONOLULU], [PARIS, FRANCE]
    full = len(pelt(SENTENCE, PAIR, entities=first, entities_pair=second)["input_ids"])
    checked = 0
    for max_length in range(4, full + 2):
        call = dict(truncation=truncation, max_length=max_length)
        try:
            enc = pelt(SENTENCE, PAIR, entities=first, entities_pair=second, **call)
        except Exception as error:  # only_first / only_second cannot fit: the wrapped tokenizer's own error
            assert truncation.startswith("only") and "truncat" in str(error).lower()
            continue
        check_whole_groups(pelt, enc, SENTENCE, PAIR, first, second, **call)
        checked += 1
    assert checked >= 5


def test_truncation_cannot_borrow_the_closing_parenthesis_of_the_pair(roberta):
    """Without special tokens the first sequence's last token touches the pair's first: a pair starting with " )"
    must not complete a group whose own ")" was truncated away."""
    pelt = PELTTokenizer(roberta, ENTITY_VOCAB)
    call = dict(add_special_tokens=False, truncation="only_first", max_length=8)  # 5 tokens for the first text
    enc = pelt("Barack Obama", " ) Paris", entities=[{"char_start": 0, "char_end": 12, "entity_id": "Q76"}], **call)
    assert tokens(pelt, enc["input_ids"])[3] == "Ġ)" and enc.token_to_sequence(3) == 1  # the pair's ")"
    assert enc["entity_positions"] == [] and enc.truncated_entities == 1
    assert enc["input_ids"] == roberta("Barack Obama", " ) Paris", **call)["input_ids"]  # group dropped, text kept


def test_truncated_batch_as_tensors(tokenizer):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt([SENTENCE, PAIR], entities=[[OBAMA, HONOLULU], [PARIS, FRANCE]], truncation=True, max_length=9,
               padding="max_length", return_tensors="pt")  # fmt: skip
    assert enc["input_ids"].shape == (2, 9)
    for b in range(2):
        row = enc["entity_positions"][b]
        for p in row[row >= 0]:
            assert enc["input_ids"][b, p] == pelt.slot_token_id
    assert enc["entity_positions"][:, 0].tolist() == [5, 3]
    assert enc.truncated_entities == [1, 1]


# ----- unknown entities, pass-through, validation ------------------------------------------------------------------
def test_unknown_entities_stay_plain_and_are_counted(tokenizer):
    pelt = PELTTokenizer(tokenizer, ["Q18094"])
    unknown_obama = {**OBAMA, "entity_id": "Q999"}
    enc = pelt(SENTENCE, entities=[unknown_obama, HONOLULU])
    assert enc.unknown_entities == 1 and enc["entity_ids"] == [0]
    assert enc["input_ids"] == tokenizer(pelt.rewrite(SENTENCE, [HONOLULU]))["input_ids"]
    batch = pelt([SENTENCE, SENTENCE], entities=[[unknown_obama], [unknown_obama, HONOLULU]])
    assert batch.unknown_entities == [1, 1]
    assert pelt.stats == {"texts": 3, "mentions": 5, "slots": 2, "unknown_entities": 3, "truncated_entities": 0}


def test_table_vocab_rows_and_zero_counts(bert):
    table = FakeTable(["Q90", "Q76", "Q18094"], ["Paris", "Barack Obama", "Honolulu"], [[], ["Obama"], []],
                      counts=[3, 5, 0])  # fmt: skip
    pelt = PELTTokenizer(bert, table)
    enc = pelt(SENTENCE, entities=[OBAMA, HONOLULU])
    assert enc["entity_ids"] == [1] and enc.unknown_entities == 1  # Honolulu has no vector (count 0)
    table.entity_ids.append("Q142")  # a table grown later is seen (looked up live)
    table.counts = torch.tensor([3, 5, 0, 2])
    assert pelt(PAIR, entities=[FRANCE])["entity_ids"] == [3]


def test_no_entities_pass_through(tokenizer):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    unknown = [{**OBAMA, "entity_id": "Q999"}]
    for kwargs in (
        dict(text=SENTENCE),
        dict(text=SENTENCE, entities=unknown),
        dict(text=SENTENCE, text_pair=PAIR),
        dict(text=[SENTENCE, PAIR, "Paris."], padding=True, return_tensors="pt"),
        dict(text=[SENTENCE, "Paris."], text_pair=[PAIR, "He."], truncation=True, max_length=12, padding=True),
    ):
        enc = pelt(**kwargs)
        plain = tokenizer(**{k: v for k, v in kwargs.items() if k != "entities"})
        assert set(enc.keys()) == set(plain.keys()) | {"entity_positions", "entity_ids"}
        for key in plain:
            same = torch.equal(enc[key], plain[key]) if torch.is_tensor(plain[key]) else enc[key] == plain[key]
            assert same, (kwargs, key)
    with_offsets = pelt(SENTENCE, return_offsets_mapping=True)
    assert with_offsets["offset_mapping"] == tokenizer(SENTENCE, return_offsets_mapping=True)["offset_mapping"]


def test_invalid_mentions_raise_naming_text_and_span(bert):
    pelt = PELTTokenizer(bert, ENTITY_VOCAB)
    overlapping = [OBAMA, {"char_start": 7, "char_end": 16, "entity_id": "Q90"}]
    with pytest.raises(ValueError, match=r"text 1: mentions overlap: \[0, 12\).*\[7, 16\)"):
        pelt([PAIR, SENTENCE], entities=[None, overlapping])
    with pytest.raises(ValueError, match=r"text_pair 0: mention span \[24, 40\) .* not within the text"):
        pelt(SENTENCE, PAIR, entities_pair=[{"char_start": 24, "char_end": 40, "entity_id": "Q142"}])
    with pytest.raises(ValueError, match="one list of mentions"):
        pelt([SENTENCE, PAIR], entities=[[OBAMA]])
    with pytest.raises(TypeError, match="entity ids are strings"):
        pelt(SENTENCE, entities=[{**OBAMA, "entity_id": 76}])
    with pytest.raises(ValueError, match="link=True needs entity names"):
        pelt(SENTENCE, link=True)
    with pytest.raises(ValueError, match="twice"):
        PELTTokenizer(bert, ["Q1", "Q1"])


# ----- linker --------------------------------------------------------------------------------------------------
def test_linker_aliases_longest_match_and_word_boundaries():
    linker = AliasLinker(
        {
            "Q60": ["New York City", "NYC"],
            "Q1384": ["New York", "NY"],
            "Q76": ["Barack Obama", "Obama"],
            "Q30": ["United States", "U.S."],
            "Q99": ["York City Hall"],
        }
    )
    text = "Obama visited new york city, not New York; Obamacare is U.S. law, not U. S. law. NYC!"
    found = [(text[m["char_start"] : m["char_end"]], m["entity_id"]) for m in linker.find(text)]
    assert found == [("Obama", "Q76"), ("new york city", "Q60"), ("New York", "Q1384"), ("U.S.", "Q30"),
                     ("NYC", "Q60")]  # fmt: skip
    # the longest candidate wins even over one that starts further left ("New York City")
    assert linker("at New York City Hall") == [{"char_start": 7, "char_end": 21, "entity_id": "Q99"}]
    assert linker("The Obamas") == [] and linker("xObama") == []
    assert AliasLinker({"Q76": ["Obama"]}, case_sensitive=True)("obama and Obama") == [
        {"char_start": 10, "char_end": 15, "entity_id": "Q76"}
    ]
    assert linker("New   York") == [{"char_start": 0, "char_end": 10, "entity_id": "Q1384"}]


def test_linker_names_beat_aliases_and_from_table(bert):
    linker = AliasLinker({"Q47899": ["Paris Hilton", "Paris"], "Q90": ["Paris", "City of Light"]})
    assert [m["entity_id"] for m in linker("Paris and Paris Hilton")] == ["Q90", "Q47899"]
    table = FakeTable(["Q90", "Q76", "Q18094"], ["Paris", "Barack Obama", None], [[], ["Obama"], ["Honolulu"]],
                      counts=[1, 1, 1])  # fmt: skip
    from_table = AliasLinker.from_table(table)
    assert [m["entity_id"] for m in from_table("Obama was born in Honolulu, not Paris.")] == ["Q76", "Q18094", "Q90"]
    pelt = PELTTokenizer(bert, table)
    linked = pelt(SENTENCE, link=True)
    explicit = pelt(SENTENCE, entities=[OBAMA, {**HONOLULU}])
    assert dict(linked) == dict(explicit) and linked["entity_ids"] == [1, 2]
    pair = pelt(SENTENCE, PAIR, link=True)
    assert pair["entity_ids"] == [1, 2, 0]


def test_link_with_nothing_to_link_warns(bert):
    nameless = FakeTable(["Q90", "Q76"], [None, None], [[], []], counts=[1, 1])
    pelt = PELTTokenizer(bert, nameless)
    with pytest.warns(UserWarning, match="nothing is linked"):
        enc = pelt(SENTENCE, link=True)
    assert enc["entity_positions"] == []
    with pytest.warns(UserWarning, match="no names or aliases"):
        PELTTokenizer(bert, ENTITY_VOCAB, linker=AliasLinker({}))([SENTENCE], link=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pelt(SENTENCE)  # no link=True: nothing to say
        PELTTokenizer(bert, ENTITY_VOCAB, linker=AliasLinker({"Q76": ["Obama"]}))(SENTENCE, link=True)


def test_table_linker_sees_entities_added_later(bert):
    table = FakeTable(["Q76"], ["Barack Obama"], [[]], counts=[1])
    pelt = PELTTokenizer(bert, table)
    assert pelt(SENTENCE, link=True)["entity_ids"] == [0]
    table.entity_ids.append("Q18094")
    table.names.append("Honolulu")
    table.aliases.append([])
    table.counts = torch.tensor([1, 1])
    assert pelt(SENTENCE, link=True)["entity_ids"] == [0, 1]


# ----- passthroughs and persistence ----------------------------------------------------------------------------------
def test_decode_and_save_load(tmp_path, tokenizer):
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    enc = pelt(SENTENCE, entities=[OBAMA])
    assert pelt.decode(enc["input_ids"], skip_special_tokens=False) == tokenizer.decode(enc["input_ids"])
    assert len(pelt) == len(tokenizer) and pelt.pad_token_id == tokenizer.pad_token_id
    files = pelt.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "pelt_tokenizer_config.json").read_text())
    assert config["slot_token"] == tokenizer.mask_token and any(f.endswith("pelt_tokenizer_config.json") for f in files)
    assert not list((tmp_path / "saved").glob("*.tmp"))
    loaded = PELTTokenizer.from_pretrained(tmp_path / "saved")
    assert loaded.slot_token == pelt.slot_token
    assert dict(loaded(SENTENCE, entities=[OBAMA])) == dict(enc)
