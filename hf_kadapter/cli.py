"""`hf-kadapter`: the knowledge benchmark and the long jobs behind it, from the command line.

    hf-kadapter bench --quick                      # the three methods against their controls, ~10 min on 2 cores
    hf-kadapter build-table --model M --corpus corpus.jsonl --output-dir table
    hf-kadapter build-index --encoder E --corpus docs.jsonl --output-dir retriever
    hf-kadapter build-cache --model kadapter-folder --task factual --data trex.json --output-dir cache
    hf-kadapter build-suite                        # rebuild the WordNet suite from /usr/share/wordnet
    hf-kadapter convert-kadapter pytorch_model.bin --base roberta-large --output-dir fac-adapter
    hf-kadapter convert-realm embedder google-realm-embedder-folder realm-embedder

Each long job shows progress bars and resumes after an interruption (rerun the same command); each takes the same
options as its Python function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "hf-kadapter"


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
def _add_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Run the knowledge benchmark (K-Adapter, PELT, REALM against their no-knowledge controls).",
        description="Run each method against the same model without it on the packaged WordNet knowledge suite, "
        "with several seeds, and print the gains with 95% bootstrap confidence intervals. Writes "
        "results.json, results.md and plots into --output-dir; an interrupted run resumes there.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="3 seeds, ~10 min (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="5 seeds, the whole suite")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="1 seed, tiny sizes, ~1 min")
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--methods",
        default="kadapter,pelt,realm,composed",
        help="comma-separated subset of kadapter,pelt,realm,composed (K-Adapter + PELT in one model)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per condition (default: 1 smoke, 3 quick, 5 full)")
    parser.add_argument("--output-dir", default="hf-kadapter-bench", help="where results and resumable work go")
    parser.add_argument("--encoder", default=None, help="encoder Hub id or folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--mlm", default=None, help="masked LM Hub id or folder (default: SPLADE-tiny)")
    parser.add_argument(
        "--eval-split", default="test", choices=("test", "dev"), help="'dev' for development (tune there, not on test)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="override one experiment setting, e.g. --set kadapter.adapter_hidden=256 (JSON values); repeatable",
    )
    parser.set_defaults(handler=_bench)


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"{PROG} bench: --set {item!r} is not METHOD.FIELD=VALUE (e.g. kadapter.head_epochs=5).")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(method, {})[field] = value
    return overrides


def _bench(args: argparse.Namespace) -> int:
    from .bench.runner import METHODS, print_summary, run_benchmark

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"{PROG} bench: unknown method(s) {unknown}; choose among {', '.join(METHODS)}.")
    overrides = _parse_overrides(args.set)
    bad = [m for m in overrides if m not in METHODS]
    if bad:
        raise SystemExit(f"{PROG} bench: --set names unknown method(s) {bad}; choose among {', '.join(METHODS)}.")
    try:
        results = run_benchmark(
            args.mode,
            methods=methods,
            seeds=args.seeds,
            output_dir=args.output_dir,
            encoder=args.encoder,
            mlm=args.mlm,
            eval_split=args.eval_split,
            overrides=overrides,
            command=" ".join([PROG, *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(PROG) else None,
        )
    except (FileNotFoundError, TypeError, ValueError) as error:
        raise SystemExit(f"{PROG} bench: {error}") from None
    print_summary(results, args.output_dir)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# build-suite
# ---------------------------------------------------------------------------------------------------------------
def _add_build_suite(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-suite",
        help="Rebuild the WordNet knowledge suite from the raw WordNet 3.0 files.",
        description="Parse WordNet 3.0 (Debian/Ubuntu: apt-get install wordnet-base) into the suite's tables. The "
        "package ships the built suite; this is how it was made, and how to check it.",
    )
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--output-dir", required=True, help="where to write the tables and suite.json")
    parser.set_defaults(handler=_build_suite)


def _build_suite(args: argparse.Namespace) -> int:
    from .bench.wordnet import build_wordnet_suite, write_wordnet_suite

    try:
        manifest = write_wordnet_suite(build_wordnet_suite(args.wordnet_dir), args.output_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"{PROG} build-suite: {error}") from None
    for table, info in manifest["tables"].items():
        print(f"{table}: {info['rows']} rows {info['splits']}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# build-table (PELT)
# ---------------------------------------------------------------------------------------------------------------
def _add_build_table(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-table",
        help="Build a PELT entity lookup table with a masked LM over a linked corpus (resumable).",
        description="build_entity_table on the command line: every mention of an entity is replaced by one mask, "
        "the masked LM's transformed output there is summed per entity. Rerun the same command to resume.",
    )
    parser.add_argument("--model", required=True, help="masked LM Hub id or folder (with its MLM head)")
    parser.add_argument("--corpus", required=True, help='JSON Lines of {"text", "mentions": [{char_start, ...}]}')
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--names", default=None, help="optional JSON file: entity id -> name")
    parser.add_argument("--max-occurrences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--norm", type=float, default=7.0)
    parser.set_defaults(handler=_build_table)


def _build_table(args: argparse.Namespace) -> int:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from .pelt import build_entity_table
    from .utils.io import read_json

    names = read_json(args.names) if args.names else None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForMaskedLM.from_pretrained(args.model)
    table = build_entity_table(
        model,
        tokenizer,
        args.corpus,
        entity_names=names,
        max_occurrences=args.max_occurrences,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        norm=args.norm,
        output_dir=args.output_dir,
        progress=True,
    )
    print(f"{table} saved in {args.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# build-index (REALM-style retriever)
# ---------------------------------------------------------------------------------------------------------------
def _add_build_index(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-index",
        help="Embed a corpus and save a RealmStyleRetriever (resumable).",
        description="RealmStyleRetriever.build_index on the command line. The embedder is a saved RetrieverEmbedder "
        "(--embedder) or a BERT-like encoder wrapped fresh (--encoder, with --projection-dim / --pooling).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedder", help="a saved RetrieverEmbedder (Hub id or folder)")
    source.add_argument("--encoder", help="a BERT-like encoder to wrap with RetrieverEmbedder.from_encoder")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--pooling", default="cls", choices=("cls", "mean", "pooler"))
    parser.add_argument("--corpus", required=True, help='JSON Lines of {"id", "title", "text"}')
    parser.add_argument("--output-dir", required=True, help="the retriever folder (embeddings are resumed from it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=288)
    parser.add_argument("--backend", default="exact", help="index backend: exact, or a faiss one (see DocumentIndex)")
    parser.set_defaults(handler=_build_index)


def _build_index(args: argparse.Namespace) -> int:
    import datasets
    from transformers import AutoTokenizer

    from .retrieval import RealmStyleRetriever, RetrieverEmbedder

    if args.embedder:
        embedder = RetrieverEmbedder.from_pretrained(args.embedder)
        tokenizer = AutoTokenizer.from_pretrained(args.embedder)
    else:
        embedder = RetrieverEmbedder.from_encoder(args.encoder, projection_dim=args.projection_dim, pooling=args.pooling)
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
    corpus = datasets.load_dataset("json", data_files=args.corpus, split="train")
    retriever = RealmStyleRetriever(embedder, tokenizer)
    output = Path(args.output_dir)
    retriever.build_index(
        corpus,
        batch_size=args.batch_size,
        max_length=args.max_length,
        output_dir=output / "embeddings",
        progress=True,
        backend=args.backend,
    )
    retriever.save_pretrained(output)
    print(f"{len(corpus)} documents indexed; retriever saved in {output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# build-cache (K-Adapter frozen-base feature cache)
# ---------------------------------------------------------------------------------------------------------------
TASKS = ("factual", "typing", "relation")


def _add_build_cache(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build-cache",
        help="Precompute a K-Adapter model's frozen-base hidden states for a dataset (resumable).",
        description="build_feature_cache on the command line: the records are loaded and preprocessed as the "
        "recipes do, then the base's hidden states the model's adapters read are written under --output-dir.",
    )
    parser.add_argument("--model", required=True, help="a saved K-Adapter model or head (folder or Hub id)")
    parser.add_argument("--task", required=True, choices=TASKS, help="record format: T-REx, Open Entity or TACRED")
    parser.add_argument("--data", required=True, help="the records (JSON or JSON Lines)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--skip-malformed", action="store_true", help="skip and count malformed records")
    parser.set_defaults(handler=_build_cache)


def _build_cache(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .kadapter import KAdapterModel, build_feature_cache
    from .kadapter import data as kdata

    model = KAdapterModel.from_pretrained(args.model)
    model.freeze_base()
    tokenizer = AutoTokenizer.from_pretrained(model.config.base_model_name_or_path or args.model)
    on_error = "skip" if args.skip_malformed else "raise"
    if args.task == "typing":
        records = kdata.load_entity_typing(args.data, on_error=on_error)
        labels = kdata.build_label_vocab(records, field="labels")
        features = kdata.preprocess_entity_typing(records, tokenizer, labels, args.max_length, on_error=on_error)
    else:
        load = kdata.load_factual if args.task == "factual" else kdata.load_relation
        records = load(args.data, on_error=on_error)
        labels = kdata.build_label_vocab(records)
        preprocess = kdata.preprocess_factual if args.task == "factual" else kdata.preprocess_relation
        features = preprocess(records, tokenizer, labels, args.max_length, on_error=on_error)
    cache = build_feature_cache(model, features, args.output_dir, batch_size=args.batch_size, dtype=args.dtype)
    print(f"{cache}; {cache.disk_bytes() / 2**20:.1f} MiB")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# convert-kadapter / convert-realm: the converters' own command lines
# ---------------------------------------------------------------------------------------------------------------
CONVERTERS = {
    "convert-kadapter": (
        "hf_kadapter.kadapter.convert_original",
        "Convert an official K-Adapter fac-/lin-adapter checkpoint (pytorch_model.bin) to an hf_kadapter model.",
    ),
    "convert-realm": (
        "hf_kadapter.retrieval.convert_realm_v4",
        "Convert a transformers-v4 REALM embedder / reader / encoder checkpoint to this package's classes.",
    ),
}


def _add_converters(subparsers: Any) -> None:
    for name, (module, summary) in CONVERTERS.items():
        parser = subparsers.add_parser(name, help=summary, description=summary, add_help=False)
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the converter's arguments (see --help)")
        parser.set_defaults(handler=lambda args, module=module: _convert(module, args.args))


def _convert(module: str, argv: list[str]) -> int:
    import importlib

    importlib.import_module(module).main(argv)
    return 0


# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the package's info logs")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_bench, _add_build_suite, _add_build_table, _add_build_index, _add_build_cache, _add_converters):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CONVERTERS:  # the converters parse their own arguments (--help included)
        return _convert(CONVERTERS[argv[0]][0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("hf_kadapter").setLevel(logging.INFO)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
