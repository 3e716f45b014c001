"""Fuzz test of the PELT tokenizer hook: seeded random texts (unicode, whitespace runs, real parentheses and masks),
random mentions (adjacent, at the edges, ending inside words, whitespace-only, unknown entities), single texts,
pairs and padded batches, truncation at random lengths, for WordPiece and byte-level BPE tokenizers.

Every expectation is derived here from the rewritten text (exposed as `rewritten_texts`) and the wrapped
tokenizer's own encoding of it, never from the hook's mapping code:
- the output is the wrapped tokenizer's output for the rewritten text, which is the text rewritten with a subset
  of the known mentions (all of them without truncation);
- slot positions point at slot tokens, one per group that survived, with the group's entity row; a group is
  either whole ("(", slot and ")" all tokenized) or entirely cut away, never half;
- offsets, `token_to_chars`, `char_to_token` and `word_ids` refer to the original text: a token's offsets span
  exactly its original characters, inserted tokens have (0, 0) and no word, every original character lands on
  the token the tokenizer gave it.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import pytest
from faults import Tally
from test_pelt_tokenization import roberta_tokenizer
from tokenizers import AddedToken
from transformers import BertTokenizer

from hf_kadapter.pelt.tokenization_pelt import PELTTokenizer

SEED = 20240611
PIECES = [
    "Barack", "Obama", "was", "born", "in", "Honolulu", "Paris", "naïve", "Ünïcödé", "straße", "e\u0301te",
    "中文", "東京", "😀", "x", "a", "(", ")", ".", ",", "!", "[MASK]", "<mask>", "42", "Obamacare",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", " ", "", "  ", "\t", "\n", " \u00a0", "   "]
ENTITIES = ["Q1", "Q2", "Q3", "Q4", "Q5"]  # rows 0-4; "Q999" is unknown


def wordpiece(folder: Path) -> BertTokenizer:
    """A WordPiece vocabulary that splits the fuzz texts into real subwords (letters, pieces, CJK characters)."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")", ".", ",", "!", "中", "文", "東", "京"]
    vocab += ["barack", "obama", "was", "born", "in", "hon", "##olu", "##lu", "paris", "naive", "##care", "ete"]
    vocab += list(letters) + [f"##{c}" for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    bert = wordpiece(tmp_path_factory.mktemp("fuzz-bert"))
    left = copy.deepcopy(bert)
    left.truncation_side = "left"
    roberta = roberta_tokenizer(tmp_path_factory.mktemp("fuzz-roberta"))
    lstrip = roberta_tokenizer(
        tmp_path_factory.mktemp("fuzz-roberta-lstrip"), mask_token=AddedToken("<mask>", lstrip=True, special=True)
    )
    return {"wordpiece": bert, "wordpiece-left": left, "bpe": roberta, "bpe-lstrip-mask": lstrip}


def random_text(rng: random.Random, insert: str) -> str:
    while True:
        parts = [rng.choice(SEPARATORS) if rng.random() < 0.3 else ""]
        for i in range(rng.randint(0, 14)):
            parts += [rng.choice(SEPARATORS)] if i else []
            parts.append(rng.choice(PIECES))
        parts.append(rng.choice(SEPARATORS) if rng.random() < 0.3 else "")
        text = "".join(parts)
        if insert not in text:  # keeps the reconstruction below unambiguous
            return text


def random_mentions(rng: random.Random, text: str) -> list[dict]:
    """Non-overlapping spans: often adjacent (gap 0), at the start and at the end, of 1-8 characters."""
    mentions, position = [], 0
    while position < len(text) and len(mentions) < 8:
        start = position + (0 if rng.random() < 0.35 else rng.randint(1, 6))
        if start >= len(text):
            break
        end = min(len(text), start + rng.randint(1, 8))
        entity = rng.choice(ENTITIES + ["Q999"])
        mentions.append({"char_start": start, "char_end": end, "entity_id": entity})
        position = end
    rng.shuffle(mentions)  # the hook must not rely on the caller's order
    return mentions


def reconstruct(pelt: PELTTokenizer, text: str, rewritten: str, mentions: list[dict]) -> list[dict]:
    """The known mentions whose group the rewritten text contains (the insert string never occurs in `text`)."""
    insert = " (" + pelt.slot_token + " )"
    kept, shift = [], 0
    for mention in sorted(mentions, key=lambda m: m["char_start"]):
        if mention["entity_id"] == "Q999":
            continue
        at = mention["char_end"] + shift
        if rewritten[at : at + len(insert)] == insert:
            kept.append(mention)
            shift += len(insert)
    assert pelt.rewrite(text, kept) == rewritten
    return kept


def original_positions(text: str, kept: list[dict], size: int) -> tuple[list[int | None], list[int]]:
    """For the text rewritten with `kept`: the original position of each rewritten character (None: inserted),
    and the rewritten position of each original character."""
    ends = sorted(m["char_end"] for m in kept)
    of_rewritten: list[int | None] = []
    of_original: list[int] = []
    for position in range(len(text) + 1):
        while ends and ends[0] == position:
            of_rewritten += [None] * size
            ends.pop(0)
        if position < len(text):
            of_original.append(len(of_rewritten))
            of_rewritten.append(position)
    return of_rewritten, of_original


def check_example(pelt, enc, b: int, texts: list[str], mentions: list[list[dict]], rows: dict) -> None:
    """All invariants for example b; texts/mentions per side."""
    slot_id, insert = pelt.slot_token_id, " (" + pelt.slot_token + " )"
    encoding = enc.encodings[b]
    rewritten = encoding.rewritten
    ids = rewritten.ids
    offsets, word_ids = enc["offset_mapping"][b], enc.word_ids(b)
    positions = list(enc["entity_positions"][b])
    slots_seen = 0
    for side, (text, side_mentions) in enumerate(zip(texts, mentions, strict=True)):
        kept = reconstruct(pelt, text, encoding.rewritten_texts[side], side_mentions)
        of_rewritten, of_original = original_positions(text, kept, len(insert))
        # tokens: offsets and words on the original text
        for t in range(len(ids)):
            if rewritten.token_to_sequence(t) != side:
                continue
            start, end = rewritten.token_to_chars(t)
            chars = [of_rewritten[r] for r in range(start, end) if of_rewritten[r] is not None]
            if start == end:
                continue
            if not chars:
                assert offsets[t] == (0, 0) and word_ids[t] is None and enc.token_to_chars(b, t) is None
            else:
                assert offsets[t] == (chars[0], chars[-1] + 1), (t, text)
                assert tuple(enc.token_to_chars(b, t)) == offsets[t] and word_ids[t] is not None
                assert text[offsets[t][0] : offsets[t][1]] == "".join(text[c] for c in chars)
        # every original character lands on the token the wrapped tokenizer gave it
        for c in range(len(text)):
            token = enc.char_to_token(b, c, sequence_index=side)
            assert token == rewritten.char_to_token(of_original[c], side), (c, text)
            if token is not None:
                assert offsets[token][0] <= c < offsets[token][1]
        # groups: whole or entirely cut away; slots in order with their rows
        side_slots = []
        for mention in sorted(kept, key=lambda m: m["char_end"]):
            group_start = of_original[mention["char_end"] - 1] + 1  # right after the mention
            touching = [
                t
                for t in range(len(ids))
                if rewritten.token_to_sequence(t) == side
                and rewritten.token_to_chars(t)[0] < group_start + len(insert)
                and rewritten.token_to_chars(t)[1] > group_start
            ]
            if not touching:
                continue
            paren, close = group_start + 1, group_start + len(insert) - 1
            covered = {r for t in touching for r in range(*rewritten.token_to_chars(t))}
            slot_tokens = [t for t in touching if ids[t] == slot_id]
            assert paren in covered and close in covered and len(slot_tokens) == 1, (text, mention)
            side_slots.append((slot_tokens[0], rows[mention["entity_id"]]))
            # the mention's own (non-blank) characters come before its slot
            last_char = mention["char_end"] - 1
            token = enc.char_to_token(b, last_char, sequence_index=side)
            if token is not None:
                assert token < slot_tokens[0]
        slots_seen += len(side_slots)
        for slot, row in side_slots:
            index = positions.index(slot)
            assert list(enc["entity_ids"][b])[index] == row
    assert len(positions) == slots_seen and all(ids[p] == slot_id for p in positions)
    assert positions == sorted(positions)
    known = sum(1 for side in mentions for m in side if m["entity_id"] != "Q999")
    truncated = enc.truncated_entities[b] if isinstance(enc.truncated_entities, list) else enc.truncated_entities
    assert len(positions) + truncated == known
    unknown = enc.unknown_entities[b] if isinstance(enc.unknown_entities, list) else enc.unknown_entities
    assert unknown == sum(1 for side in mentions for m in side if m["entity_id"] == "Q999")
    for side in range(len(texts)):  # word ids rise along each sequence
        words = [w for t, w in enumerate(word_ids) if w is not None and rewritten.token_to_sequence(t) == side]
        assert words == sorted(words)


def check_same_words_as_plain(pelt, tokenizer, text: str, mentions: list[dict]) -> bool:
    """Where the insertions leave the original text's tokens as they were and no mention ends inside a word, the
    word ids are the plain tokenizer's. Returns whether the comparison applied."""
    enc = pelt(text, entities=mentions, return_offsets_mapping=True)
    plain = tokenizer(text, return_offsets_mapping=True)
    ours = [
        (i, o) for i, o, w in zip(enc["input_ids"], enc["offset_mapping"], enc.word_ids(), strict=True) if w is not None
    ]
    theirs = [(i, o) for i, o, w in zip(plain["input_ids"], plain["offset_mapping"], plain.word_ids(), strict=True) if w is not None]  # fmt: skip
    inside_word = any(
        0 < m["char_end"] < len(text) and text[m["char_end"] - 1].isalnum() and text[m["char_end"]].isalnum()
        for m in mentions
    )
    if ours != theirs or inside_word:
        return False
    assert [w for w in enc.word_ids() if w is not None] == [w for w in plain.word_ids() if w is not None]
    return True


@pytest.mark.parametrize("kind", ["wordpiece", "wordpiece-left", "bpe", "bpe-lstrip-mask"])
def test_fuzz_hook(tokenizers, kind):
    started = time.perf_counter()
    tokenizer = tokenizers[kind]
    pelt = PELTTokenizer(tokenizer, ENTITIES)
    rows = {entity: row for row, entity in enumerate(ENTITIES)}
    insert = " (" + pelt.slot_token + " )"
    rng = random.Random(f"{SEED}-{kind}")
    compared_words = truncated_cases = refused = 0
    for case in range(100):
        text, pair = random_text(rng, insert), random_text(rng, insert)
        mentions, mentions_pair = random_mentions(rng, text), random_mentions(rng, pair)
        # single text, whole
        enc = pelt(text, entities=mentions, return_offsets_mapping=True)
        plain = tokenizer(enc.encodings[0].rewritten_texts[0])
        assert enc["input_ids"] == plain["input_ids"] and enc["attention_mask"] == plain["attention_mask"]
        assert enc.truncated_entities == 0  # nothing is dropped without truncation
        assert pelt(text, entities=mentions)["input_ids"] == enc["input_ids"]  # offsets do not change tokens
        batched = {k: [v] for k, v in enc.items()}
        enc_as_batch = pelt([text], entities=[mentions], return_offsets_mapping=True)
        assert dict(enc_as_batch) == batched
        check_example(pelt, enc_as_batch, 0, [text], [mentions], rows)
        compared_words += check_same_words_as_plain(pelt, tokenizer, text, mentions)
        # single text, truncated at a random length
        full = len(enc["input_ids"])
        max_length = rng.randint(2, full + 1)
        enc = pelt([text], entities=[mentions], truncation=True, max_length=max_length, return_offsets_mapping=True)
        plain = tokenizer(list(enc.encodings[0].rewritten_texts), truncation=True, max_length=max_length)
        assert enc["input_ids"] == plain["input_ids"] and len(enc["input_ids"][0]) <= max_length
        check_example(pelt, enc, 0, [text], [mentions], rows)
        truncated_cases += enc.truncated_entities[0] > 0
        # a pair, maybe truncated
        call = {"add_special_tokens": case % 3 != 0}  # without them the two sequences touch
        if case % 2:
            whole = len(pelt(text, pair, entities=mentions, entities_pair=mentions_pair, **call)["input_ids"])
            call.update(
                truncation=rng.choice(["longest_first", "only_first"]), max_length=rng.randint(3, max(3, whole))
            )
        try:
            enc = pelt([text], [pair], entities=[mentions], entities_pair=[mentions_pair], return_offsets_mapping=True,
                       **call)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - only if the wrapped tokenizer refuses the same request
            rewritten = pelt.rewrite(text, mentions), pelt.rewrite(pair, mentions_pair)
            with pytest.raises(Exception, match="Truncation error"):  # e.g. only_first with a first text too short
                tokenizer(*rewritten, **call)
            assert isinstance(error, ValueError) and "cannot fit max_length" in str(error)  # named, with the fix
            refused += 1
            continue
        rewritten = enc.encodings[0].rewritten_texts
        plain = tokenizer([rewritten[0]], [rewritten[1]], **call)
        assert enc["input_ids"] == plain["input_ids"]
        if "token_type_ids" in plain:
            assert enc["token_type_ids"] == plain["token_type_ids"]
        check_example(pelt, enc, 0, [text, pair], [mentions, mentions_pair], rows)
    # padded batches, both padding sides, one of them truncated
    for side in ("right", "left"):
        texts = [random_text(rng, insert) for _ in range(6)]
        mentions = [random_mentions(rng, t) for t in texts]
        call = dict(padding=True, padding_side=side)
        if side == "left":
            call.update(truncation=True, max_length=12)
        enc = pelt(texts, entities=mentions, return_offsets_mapping=True, **call)
        plain = tokenizer([e.rewritten_texts[0] for e in enc.encodings], **call)
        assert enc["input_ids"] == plain["input_ids"] and enc["attention_mask"] == plain["attention_mask"]
        for b, (text, text_mentions) in enumerate(zip(texts, mentions, strict=True)):
            check_example(pelt, enc, b, [text], [text_mentions], rows)
    assert compared_words >= 8 and truncated_cases >= 5  # the generator does reach those cases
    assert refused < 20  # most pair cases are checked
    assert time.perf_counter() - started < 20


def test_fuzz_overlapping_mentions_are_refused(tokenizers):
    pelt = PELTTokenizer(tokenizers["bpe"], ENTITIES)
    rng = random.Random(SEED)
    for _ in range(50):
        text = random_text(rng, " (<mask> )") + " padding text"
        start = rng.randrange(len(text) - 2)
        end = rng.randint(start + 2, len(text))
        inner = rng.randint(start + 1, end - 1)
        overlapping = [
            {"char_start": start, "char_end": end, "entity_id": "Q1"},
            {"char_start": inner, "char_end": min(len(text), inner + rng.randint(1, 3)), "entity_id": "Q2"},
        ]
        with pytest.raises(ValueError, match="mentions overlap"):
            pelt(text, entities=overlapping)


BROKEN_MENTIONS = [  # (mention, what the error names)
    ({"char_start": -1, "char_end": 2, "entity_id": "Q1"}, "span"),
    ({"char_start": 0, "char_end": 10_000, "entity_id": "Q1"}, "span"),
    ({"char_start": 2, "char_end": 2, "entity_id": "Q1"}, "span"),
    ({"char_start": True, "char_end": 2, "entity_id": "Q1"}, "span"),  # a bool is not an offset
    ({"char_start": 0.0, "char_end": 1, "entity_id": "Q1"}, "span"),
    ({"char_start": 0, "char_end": 1, "entity_id": 1}, "entity"),
    ({"char_start": 0, "char_end": 1}, "entity_id"),
    ("Q1", "mention"),
]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_fuzz_broken_mentions_and_impossible_truncation_are_refused_by_name(tokenizers, kind):
    """Random texts with one broken mention among valid ones: a ValueError/TypeError naming the text, never another
    exception nor a silent result; a truncation the rewritten pair cannot meet is a ValueError naming the fix."""
    tally = Tally("bad_input")
    pelt = PELTTokenizer(tokenizers[kind], ENTITIES)
    insert = " (" + pelt.slot_token + " )"
    rng = random.Random(f"{SEED}-broken-{kind}")
    refused = 0
    for _ in range(60):
        text = random_text(rng, insert) + " and some more text"
        broken, named = rng.choice(BROKEN_MENTIONS)
        mentions = [m for m in random_mentions(rng, text) if m["char_start"] > 3] + [broken]
        with pytest.raises((ValueError, TypeError)) as caught:
            pelt([text, text], entities=[[], mentions])
        message = str(caught.value)
        assert message.startswith("text 1") and named in message, message
        refused += 1
    first = "word " * 40
    with pytest.raises(ValueError, match=r"cannot fit max_length=8.*truncation='longest_first'"):
        pelt(first, "x", entities=[{"char_start": 0, "char_end": 4, "entity_id": "Q1"}], truncation="only_second",
             max_length=8)  # fmt: skip
    tally.counts[f"tokenizer_fuzz_{kind}"] = {"error_survived": refused + 1}
    tally.write()
