"""Fuzz test of the PELT tokenizer hook: random texts (unicode, punctuation, whitespace runs, literal slot strings,
brackets), random mentions (valid, overlapping, out of range, wrong types) and random truncation, for WordPiece and
byte-level BPE. Valid input always gives whole slot groups whose slots are exactly `entity_positions`; invalid input
always gives a ValueError/TypeError naming the text, never another exception or a silent wrong answer."""

from __future__ import annotations

import random

import pytest
from faults import Tally
from test_pelt_tokenization import ENTITY_VOCAB, bert_tokenizer, roberta_tokenizer

from hf_kadapter.pelt.tokenization_pelt import PELTTokenizer

TALLY = Tally("bad_input")
WORDS = ["Barack", "Obama", "was", "born", "in", "Honolulu", "Paris", "is", "the", "capital", "of", "France", "(",
         ")", "((", "[MASK]", "<mask>", "é", "naïve", "東京", "🙂", "-", ".", ",", "'s", "\u200b", "x" * 30]  # fmt: skip
SPACES = [" ", " ", " ", "  ", "\t", "\n", ""]
CASES = 250


def random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
    return "".join(word + rng.choice(SPACES) for word in words).strip() or "x"


def random_mentions(rng: random.Random, text: str, valid: bool) -> list:
    """Non-overlapping in-range spans (valid), or one broken mention among valid ones."""
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 2 * rng.randint(0, 3))))
    mentions = [
        {"char_start": a, "char_end": b, "entity_id": rng.choice(ENTITY_VOCAB + ["Q-unknown"])}
        for a, b in zip(cuts[::2], cuts[1::2], strict=False)
        if a < b
    ]
    if valid:
        return mentions
    broken = rng.choice([
        {"char_start": -1, "char_end": 2, "entity_id": "Q90"},
        {"char_start": 0, "char_end": len(text) + 3, "entity_id": "Q90"},
        {"char_start": 2, "char_end": 2, "entity_id": "Q90"},
        {"char_start": True, "char_end": 2, "entity_id": "Q90"},
        {"char_start": 0.0, "char_end": 1, "entity_id": "Q90"},
        {"char_start": 0, "char_end": 1, "entity_id": 90},
        {"char_start": 0, "char_end": 1},
        "Q90",
        {"char_start": 0, "char_end": len(text), "entity_id": "Q76"},  # overlaps any other mention
    ])  # fmt: skip
    if isinstance(broken, dict) and broken.get("char_end") == len(text) and not mentions:
        mentions = [{"char_start": 0, "char_end": 1, "entity_id": "Q90"}]  # make the overlap real
    return mentions + [broken]


def check_output(pelt: PELTTokenizer, encoding, mentions: list, max_length: int | None) -> None:
    ids = encoding["input_ids"]
    if max_length is not None:
        assert len(ids) <= max_length
    positions, rows = encoding["entity_positions"], encoding["entity_ids"]
    slots = [i for i, token in enumerate(ids) if token == pelt.slot_token_id and i in set(positions)]
    assert positions == sorted(set(positions)) == slots
    tokens = pelt.convert_ids_to_tokens(ids)
    for position in positions:
        assert tokens[position - 1].lstrip("Ġ") == "(" and tokens[position + 1].lstrip("Ġ") == ")", tokens
    known = [m for m in mentions if m["entity_id"] in ENTITY_VOCAB]
    assert len(positions) + encoding.truncated_entities == len(known)
    assert encoding.unknown_entities == len(mentions) - len(known)
    expected_rows = [ENTITY_VOCAB.index(m["entity_id"]) for m in sorted(known, key=lambda m: m["char_start"])]
    assert rows == expected_rows[: len(rows)] or set(rows) <= set(expected_rows)
    assert len(encoding["attention_mask"]) == len(ids)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_fuzz(kind, tmp_path):
    tokenizer = bert_tokenizer(tmp_path) if kind == "bert" else roberta_tokenizer(tmp_path)
    pelt = PELTTokenizer(tokenizer, ENTITY_VOCAB)
    rng = random.Random(kind)
    outcomes = {"valid": 0, "refused": 0}
    for index in range(CASES):
        text = random_text(rng)
        valid = rng.random() < 0.7
        mentions = random_mentions(rng, text, valid)
        max_length = rng.choice([None, 4, 6, 9, 16, 64])
        call = dict(truncation=max_length is not None, max_length=max_length)
        if rng.random() < 0.3:
            pair = random_text(rng)
            call.update(text_pair=pair, entities_pair=random_mentions(rng, pair, True))
            if max_length is not None:
                call["truncation"] = rng.choice(["longest_first", "only_first", "only_second"])
        try:
            encoding = pelt(text, entities=mentions, **call)
        except (ValueError, TypeError) as error:
            assert not valid or "cannot fit max_length" in str(error), (index, text, mentions, error)
            assert str(error).startswith(("text", "text_pair")), error
            outcomes["refused"] += 1
            continue
        except Exception as error:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"case {index}: {type(error).__name__}: {error} for {text!r} {mentions} {call}")
        assert valid, (index, text, mentions, "an invalid mention was accepted")
        check_output(pelt, encoding, mentions + call.get("entities_pair", []) if "text_pair" in call else mentions,
                     max_length)  # fmt: skip
        outcomes["valid"] += 1
    assert outcomes["valid"] > 50 and outcomes["refused"] > 20, outcomes
    TALLY.add(f"tokenizer_fuzz_{kind}", "error", True)
    TALLY.counts[f"tokenizer_fuzz_{kind}"] = {"valid_checked": outcomes["valid"], "error_refused": outcomes["refused"]}
    TALLY.write()
