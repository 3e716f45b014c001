"""The WordNet knowledge suite: a miniature, versioned knowledge benchmark built from WordNet 3.0.

WordNet's ~7.7k instance synsets are named entities (Paris, Mozart, the Thames) with types (the instance
hypernym: city, composer, river; the lexicographer file: person, location ...), relations between them (part of,
member of, region, topic) and one-line glosses. From the raw Debian files (`apt-get install wordnet-base`,
/usr/share/wordnet) `build_wordnet_suite` makes five tables, all split BY ENTITY with a fixed hash so no test entity
appears in a downstream training split:

- `entities`: id, name, aliases, coarse type, fine types, gloss, split.
- `facts`: relation sentences in the package's T-REx record format (distant supervision: an entity's own gloss,
  "<name> : <gloss>", that mentions a lemma of a synset the entity points to), for adapter pretraining. The
  knowledge source covers every entity; sentences that are also dev/test typing contexts are left out.
- `typing`: mentions of an entity inside OTHER synsets' glosses, in the Open Entity record format
  (sent, start, end, labels = coarse type + fine types).
- `documents`: the gloss corpus (id, title, text) for retrieval and entity tables.
- `questions`: questions with answers generated from the relations, for open-domain QA.
- `mentions`: a linked corpus in the PELT builder's format (text + entity mentions): every definition or example
  that names an entity, plus one sentence per entity from its own definition ("<name> is <definition>", `own`
  naming the entity), so a table can be built with or without an entity's own definition.

The built suite ships inside the package (`load_wordnet_suite`), so the benchmark needs no apt-get; a test
rebuilds it from the raw files and checks it matches the shipped copy byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDNET_DIR = Path("/usr/share/wordnet")
SUITE_DIR = Path(__file__).resolve().parent / "data" / "wordnet_suite"
SUITE_VERSION = "1.0.0"
TABLES = ("entities", "facts", "typing", "documents", "questions", "mentions")

# Lexicographer files of noun synsets (wndb(5WN) / lexnames(5WN)); instances fall into a handful of them.
LEXFILES = {
    3: "tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 16: "motive",
    17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity",
    24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}  # fmt: skip
# Coarse types: the three big lexicographer files, the rest pooled (act, communication, artifact, group, time ...).
COARSE_TYPES = ("person", "location", "object", "other")
# Pointers of an instance synset that become relations (the source synset is the subject).
RELATIONS = {
    "@i": "instance_of",
    "#p": "part_of",
    "%p": "has_part",
    "#m": "member_of",
    "%m": "has_member",
    ";c": "topic",
    ";r": "region",
    ";u": "usage",
}
MIN_FINE_TYPE_ENTITIES = 20
MAX_CONTEXTS_PER_ENTITY = 8  # a fine type (instance hypernym) becomes a label when this many entities have it
SPLIT_FRACTIONS = (("train", 0.6), ("dev", 0.2), ("test", 0.2))
_TOKEN = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
_EXAMPLES = re.compile(r';\s*"')  # glosses end with quoted example sentences: '; "an example"'


@dataclass
class Synset:
    offset: str
    pos: str
    lexfile: int
    words: list[str]
    pointers: list[tuple[str, str, str]]  # (symbol, target offset, target pos)
    gloss: str
    examples: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"wn:{self.pos}{self.offset}"


def read_synsets(wordnet_dir: Path, pos: str) -> Iterator[Synset]:
    """Parse one data.<pos> file (format in wndb(5WN)); the license header lines start with two spaces."""
    path = wordnet_dir / f"data.{pos}"
    tag = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}[pos]
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, 1):
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            try:
                count = int(fields[3], 16)
                words = [re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
                at = 4 + 2 * count
                pointers = [
                    (fields[at + 1 + 4 * i], fields[at + 2 + 4 * i], fields[at + 3 + 4 * i])
                    for i in range(int(fields[at]))
                ]
            except (IndexError, ValueError) as error:
                raise ValueError(f"{path}, line {number}: not a WordNet data line ({error}).") from None
            definition, examples = _split_gloss(gloss.strip())
            yield Synset(fields[0], tag, int(fields[1]), words, pointers, definition, examples)


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    """'definition; "example one"; "example two"' -> (definition, [examples])."""
    parts = _EXAMPLES.split(gloss, maxsplit=1)
    definition = parts[0].strip().rstrip(";").strip()
    examples = re.findall(r'"([^"]+)"', parts[1]) if len(parts) > 1 else []
    return definition, [e.strip() for e in examples if e.strip()]


def tokens(text: str) -> list[tuple[int, int, str]]:
    """(start, end, token) for word tokens (with inner hyphens/apostrophes) and single punctuation marks."""
    return [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]


def entity_split(entity_id: str) -> str:
    """Fixed split by entity: a hash of the id, so it never depends on what else is in the suite."""
    value = int.from_bytes(hashlib.sha256(f"wordnet-suite:{entity_id}".encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        total += fraction
        if value < total:
            return name
    return SPLIT_FRACTIONS[-1][0]


def coarse_type(lexfile: int) -> str:
    name = LEXFILES.get(lexfile, "other")
    return name if name in COARSE_TYPES else "other"


def _find_words(text_tokens: list[tuple[int, int, str]], phrase: str, start_at: int = 0) -> tuple[int, int] | None:
    """Inclusive token span of the first occurrence of `phrase` (whole tokens; lower-case phrases match any case)."""
    wanted = [t for _, _, t in tokens(phrase)]
    if not wanted:
        return None
    fold = phrase[:1].islower()
    words = [t.casefold() if fold else t for _, _, t in text_tokens]
    target = [w.casefold() if fold else w for w in wanted]
    for i in range(start_at, len(words) - len(target) + 1):
        if words[i : i + len(target)] == target:
            return i, i + len(target) - 1
    return None


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def build_wordnet_suite(wordnet_dir: str | Path = WORDNET_DIR) -> dict[str, list[dict[str, Any]]]:
    """The five tables as lists of records (deterministic: same raw files, same records in the same order)."""
    from ..pelt.tokenization_pelt import AliasLinker

    wordnet_dir = Path(wordnet_dir)
    if not (wordnet_dir / "data.noun").is_file():
        raise FileNotFoundError(
            f"WordNet 3.0 is not in {wordnet_dir}: install it (Debian/Ubuntu: `apt-get install wordnet-base`) or "
            "pass the folder holding data.noun. The benchmark itself does not need it: the built suite ships with "
            "the package (load_wordnet_suite)."
        )
    nouns = {s.offset: s for s in read_synsets(wordnet_dir, "noun")}
    instances = {o: s for o, s in nouns.items() if any(p[0] == "@i" for p in s.pointers)}

    # ----- entities and their types ---------------------------------------------------------------------------
    hypernyms = {o: [nouns[t].words[0] for sym, t, _ in s.pointers if sym == "@i"] for o, s in instances.items()}
    fine_counts = Counter(h for names in hypernyms.values() for h in set(names))
    fine_labels = sorted(h for h, c in fine_counts.items() if c >= MIN_FINE_TYPE_ENTITIES)
    entities = []
    for offset in sorted(instances):
        synset = instances[offset]
        entities.append(
            {
                "id": synset.id,
                "name": synset.words[0],
                "aliases": synset.words[1:],
                "coarse_type": coarse_type(synset.lexfile),
                "lexfile": LEXFILES.get(synset.lexfile, str(synset.lexfile)),
                "fine_types": sorted({h for h in hypernyms[offset] if h in fine_labels}),
                "hypernyms": hypernyms[offset],
                "gloss": synset.gloss,
                "split": entity_split(synset.id),
            }
        )
    by_id = {e["id"]: e for e in entities}

    # ----- the linker: capitalised names only, most frequent sense first ------------------------------------
    ranks = _sense_ranks(wordnet_dir)

    def priority(offset: str) -> tuple[int, str]:
        words = instances[offset].words
        return min(ranks.get((w.replace(" ", "_").lower(), offset), 99) for w in words), offset

    order = sorted(instances, key=priority)
    linker = AliasLinker(
        {instances[o].id: [w for w in instances[o].words if w[:1].isupper()] for o in order}, case_sensitive=True
    )

    # ----- typing contexts: an entity mentioned in another synset's definition or example ------------------
    # At most MAX_CONTEXTS_PER_ENTITY per entity (countries are mentioned hundreds of times), preferring contexts
    # from non-entity synsets: an entity's own definition is also its fact sentence, which must not be a test context.
    candidates: dict[str, list[tuple[tuple[int, str], dict[str, Any]]]] = defaultdict(list)
    for pos in ("noun", "verb", "adj", "adv"):
        for synset in read_synsets(wordnet_dir, pos):
            is_entity = pos == "noun" and synset.offset in instances
            texts = [("definition", synset.gloss)] + [(f"example{i}", e) for i, e in enumerate(synset.examples)]
            for kind, text in texts:
                for mention in linker.find(text):
                    entity = by_id[mention["entity_id"]]
                    if mention["entity_id"] == synset.id:
                        continue
                    row = {
                        "id": f"{synset.id}:{kind}:{mention['char_start']}",
                        "entity_id": entity["id"],
                        "sent": text,
                        "start": mention["char_start"],
                        "end": mention["char_end"],
                        "labels": [entity["coarse_type"], *entity["fine_types"]],
                        "source": synset.id,
                        "split": entity["split"],
                    }
                    key = (int(is_entity), hashlib.sha256(row["id"].encode()).hexdigest())
                    candidates[entity["id"]].append((key, row))
    typing: list[dict[str, Any]] = []
    contexts_by_split: dict[str, set[str]] = defaultdict(set)
    for entity_id in sorted(candidates):
        for _, row in sorted(candidates[entity_id], key=lambda item: item[0])[:MAX_CONTEXTS_PER_ENTITY]:
            typing.append(row)
            contexts_by_split[row["split"]].add(row["sent"])
    held_out_texts = contexts_by_split["dev"] | contexts_by_split["test"]

    # ----- facts: an entity's own definition mentioning what it points to ------------------------------------
    facts: list[dict[str, Any]] = []
    dropped_overlap = 0
    for offset in sorted(instances):
        synset = instances[offset]
        subject = by_id[synset.id]
        if synset.gloss in held_out_texts:
            dropped_overlap += sum(1 for p in synset.pointers if p[0] in RELATIONS)
            continue
        sentence = f"{subject['name']} : {synset.gloss}"
        sentence_tokens = tokens(sentence)
        subject_end = len(tokens(subject["name"])) - 1
        seen: set[tuple[int, int]] = set()
        for symbol, target, target_pos in synset.pointers:
            if symbol not in RELATIONS or target_pos != "n":
                continue
            target_synset = nouns[target]
            span = None
            for lemma in target_synset.words:
                span = _find_words(sentence_tokens, lemma, start_at=subject_end + 2)
                if span is not None:
                    break
            if span is None or span in seen:
                continue
            seen.add(span)
            target_entity = by_id.get(target_synset.id)
            facts.append(
                {
                    "token": [t for _, _, t in sentence_tokens],
                    "subj_start": 0,
                    "subj_end": subject_end,
                    "obj_start": span[0],
                    "obj_end": span[1],
                    "relation": RELATIONS[symbol],
                    "docid": synset.id,
                    "subj_label": synset.id,
                    "obj_label": target_synset.id,
                    "subj_type": subject["coarse_type"],
                    "obj_type": target_entity["coarse_type"] if target_entity else "concept",
                    "split": "dev" if entity_split(f"fact:{synset.id}:{span[0]}") == "test" else "train",
                }
            )

    # ----- documents: every noun definition that names an entity or is an entity's or its type's -----------
    wanted = set(instances)
    wanted |= {t for s in instances.values() for sym, t, pos in s.pointers if sym in RELATIONS and pos == "n"}
    mentioned_in = {row["source"] for rows in candidates.values() for _, row in rows if row["source"].startswith("wn:n")}
    documents = []
    for offset in sorted(nouns):
        synset = nouns[offset]
        if offset in wanted or synset.id in mentioned_in:
            documents.append({"id": synset.id, "title": ", ".join(synset.words), "text": synset.gloss})

    # ----- questions: one per (subject, relation) whose answer is in the subject's definition --------------
    questions = _questions(facts, by_id, instances, nouns)

    # ----- mentions: the linked corpus for entity tables -------------------------------------------------------
    mentions = []
    for offset in sorted(instances):
        synset = instances[offset]
        name = synset.words[0]
        text = f"{name} is {synset.gloss}"
        found = [{"char_start": 0, "char_end": len(name), "entity_id": synset.id}]
        shift = len(name) + len(" is ")
        for m in linker.find(synset.gloss):
            if m["entity_id"] != synset.id:
                found.append({**m, "char_start": m["char_start"] + shift, "char_end": m["char_end"] + shift})
        mentions.append({"id": f"{synset.id}:own", "text": text, "mentions": found, "own": synset.id})
    texts: dict[str, dict[str, Any]] = {}
    for rows in candidates.values():
        for _, row in rows:
            record = texts.setdefault(
                row["id"].rsplit(":", 1)[0], {"id": row["id"].rsplit(":", 1)[0], "text": row["sent"], "mentions": []}
            )
            record["mentions"].append({"char_start": row["start"], "char_end": row["end"], "entity_id": row["entity_id"]})
    for key in sorted(texts):
        record = texts[key]
        record["mentions"].sort(key=lambda m: m["char_start"])
        mentions.append({**record, "own": None})
    suite = {
        "entities": entities, "facts": facts, "typing": typing, "documents": documents, "questions": questions,
        "mentions": mentions,
    }  # fmt: skip
    suite["_stats"] = [  # type: ignore[assignment]
        {
            "fine_labels": fine_labels,
            "facts_dropped_as_heldout_contexts": dropped_overlap,
        }
    ]
    return suite


QUESTION_TEMPLATES = {
    "instance_of": "What kind of thing is {subject}?",
    "part_of": "What is {subject} part of?",
    "member_of": "What is {subject} a member of?",
    "region": "With what region is {subject} associated?",
    "topic": "In what field is {subject} known?",
    "has_part": "What is part of {subject}?",
}


def _questions(facts, by_id, instances, nouns) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for fact in facts:
        if fact["relation"] in QUESTION_TEMPLATES:
            grouped[(fact["subj_label"], fact["relation"])].append(fact)
    questions = []
    for (subject_id, relation), rows in sorted(grouped.items()):
        subject = by_id[subject_id]
        answers = []
        for row in rows:
            answer = " ".join(row["token"][row["obj_start"] : row["obj_end"] + 1])
            if answer not in answers:
                answers.append(answer)
        questions.append(
            {
                "id": f"{subject_id}:{relation}",
                "question": QUESTION_TEMPLATES[relation].format(subject=subject["name"]),
                "answers": answers,
                "relation": relation,
                "entity_id": subject_id,
                "gold_document": subject_id,
                "split": subject["split"],
            }
        )
    return questions


def _sense_ranks(wordnet_dir: Path) -> dict[tuple[str, str], int]:
    """(lemma, synset offset) -> sense number in index.noun (0 = the lemma's most frequent sense)."""
    ranks = {}
    with open(wordnet_dir / "index.noun", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            fields = line.split()
            offsets = fields[-int(fields[2]) :]
            for rank, offset in enumerate(offsets):
                ranks[(fields[0], offset)] = rank
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# Writing and loading
# ---------------------------------------------------------------------------------------------------------------
def _dump(records: list[dict[str, Any]]) -> bytes:
    """Deterministic gzip'd JSON Lines (mtime 0, no file name), so rebuilds compare byte for byte."""
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    return gzip.compress(body, compresslevel=9, mtime=0)


def write_wordnet_suite(suite: dict[str, list[dict[str, Any]]], output_dir: str | Path = SUITE_DIR) -> dict[str, Any]:
    """Write the tables (`<table>.jsonl.gz`) and `suite.json` (version, counts, checksums) into output_dir."""
    from ..utils.io import atomic_write

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"name": "wordnet-knowledge-suite", "version": SUITE_VERSION, "tables": {}}
    for table in TABLES:
        payload = _dump(suite[table])
        with atomic_write(output_dir / f"{table}.jsonl.gz", "wb") as stream:
            stream.write(payload)
        counts = Counter(r.get("split", "all") for r in suite[table])
        manifest["tables"][table] = {
            "file": f"{table}.jsonl.gz",
            "sha256": hashlib.sha256(payload).hexdigest(),
            "rows": len(suite[table]),
            "splits": dict(sorted(counts.items())),
        }
    manifest.update(suite["_stats"][0])
    with atomic_write(output_dir / "suite.json") as stream:
        json.dump(manifest, stream, indent=2, sort_keys=True)
        stream.write("\n")
    return manifest


def suite_manifest(suite_dir: str | Path = SUITE_DIR) -> dict[str, Any]:
    path = Path(suite_dir) / "suite.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the WordNet suite is not built. Build it with `hf-kadapter build-suite` "
            "(needs WordNet 3.0: apt-get install wordnet-base)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def suite_checksum(suite_dir: str | Path = SUITE_DIR) -> str:
    """One digest of every table (what results.json records as the data checksum)."""
    manifest = suite_manifest(suite_dir)
    joined = "".join(f"{t}:{manifest['tables'][t]['sha256']};" for t in TABLES)
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def read_table(table: str, suite_dir: str | Path = SUITE_DIR) -> list[dict[str, Any]]:
    """One table as a list of records (checked against the suite's checksum, so damage is named, not used)."""
    if table not in TABLES:
        raise ValueError(f"Unknown table {table!r}: the suite has {TABLES}.")
    manifest = suite_manifest(suite_dir)
    path = Path(suite_dir) / manifest["tables"][table]["file"]
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != manifest["tables"][table]["sha256"]:
        raise ValueError(
            f"{path} does not match the checksum in suite.json: the file is damaged or was edited. Reinstall "
            "the package or rebuild the suite with `hf-kadapter build-suite`."
        )
    return [json.loads(line) for line in gzip.decompress(payload).decode("utf-8").splitlines()]


def load_wordnet_suite(table: str, suite_dir: str | Path = SUITE_DIR):
    """One table of the shipped suite as a `datasets.DatasetDict` keyed by split (train/dev/test, or `all` for
    the document corpus), e.g. `load_wordnet_suite("typing")["test"]`."""
    import datasets  # noqa: PLC0415

    rows = read_table(table, suite_dir)
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_split[row.get("split", "all")].append(row)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(by_split[split]) for split in sorted(by_split, key=_split_order)}
    )


def _split_order(split: str) -> tuple[int, str]:
    order = {name: i for i, (name, _) in enumerate(SPLIT_FRACTIONS)}
    return order.get(split, len(order)), split


__all__ = [
    "COARSE_TYPES",
    "SUITE_DIR",
    "TABLES",
    "build_wordnet_suite",
    "entity_split",
    "load_wordnet_suite",
    "read_table",
    "suite_checksum",
    "suite_manifest",
    "write_wordnet_suite",
]
