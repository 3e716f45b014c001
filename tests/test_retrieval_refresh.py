"""IndexRefreshCallback: the current corpus with its settings, a swap at a fixed step, checkpoints and resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_distributed import _free_port
from test_retrieval_realm import DOCS, make_retriever
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerState

from hf_kadapter.retrieval.index import DocumentIndex
from hf_kadapter.retrieval.realm import ict_examples, ict_loss
from hf_kadapter.retrieval.refresh import IndexRefreshCallback, refresh_device

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _expected(retriever, embedder, ids):
    """What `embedder` makes of the documents `ids` ("title [SEP] text", as build_index)."""
    records = retriever.get_documents(ids)
    inputs = retriever.tokenize_documents([r["title"] for r in records], [r["text"] for r in records], 32)
    with torch.no_grad():
        return embedder.eval().embed_documents(**dict(inputs))


def _state(step: int, max_steps: int = 100) -> TrainerState:
    return TrainerState(global_step=step, max_steps=max_steps)


def test_refresh_embeds_the_current_corpus_keeps_settings_and_replays_changes(tmp_path):
    pytest.importorskip("faiss")
    retriever, corpus = make_retriever(tmp_path)
    old = retriever.index
    retriever.index = DocumentIndex(old.ids, old.embeddings, backend="faiss", faiss_index="ivf", nlist=1, nprobe=1,
                                    chunk_size=5, query_batch_size=7, documents=corpus)  # fmt: skip
    new_doc = Dataset.from_dict({"id": ["d6"], "title": ["oslo"], "text": ["oslo is the capital of norway."]})
    retriever.add_documents(new_doc, max_length=32)
    retriever.remove_documents(["d1"])
    with torch.no_grad():
        for parameter in retriever.embedder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    callback = IndexRefreshCallback(retriever, every_n_steps=2, batch_size=2, max_length=32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    callback.on_step_end(args, _state(2), None)
    assert callback.pending_swap_step == 4
    snapshot = _expected(retriever, retriever.embedder, ["d0", "d3"])
    # Changes while the refresh runs are replayed on the refreshed index.
    late = Dataset.from_dict({"id": ["d7"], "title": ["bern"], "text": ["bern is the capital of switzerland."]})
    retriever.add_documents(late, max_length=32)
    added_with = retriever.index.get(["d7"])
    retriever.remove_documents(["d2"])
    callback.on_step_end(args, _state(3), None)
    assert retriever.index.backend == "faiss" and callback.refreshes == []  # not before its step, even if done
    callback.on_step_end(args, _state(4), None)
    new = retriever.index
    assert callback.refreshes == [(2, 4)] and new is not old
    assert new.ids == ["d0", "d3", "d4", "d5", "d6", "d7"]
    assert new.settings() == {**old.settings(), "backend": "faiss", "faiss_index": "ivf", "nlist": 1, "nprobe": 1,
                              "chunk_size": 5, "query_batch_size": 7}  # fmt: skip
    torch.testing.assert_close(new.get(["d0", "d3"]), snapshot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.get(["d7"]), added_with)
    assert retriever.retrieve(["oslo"], k=6, max_length=32).mask.all()


class _SlowDocuments(list):
    """A corpus whose look-ups take time, so a refresh is still running at its swap step."""

    def __getitem__(self, item):
        time.sleep(0.05)
        return super().__getitem__(item)


def test_swap_waits_for_a_slow_refresh_at_its_fixed_step_and_errors_reach_the_trainer(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    retriever.documents = _SlowDocuments({"id": i, "title": t, "text": x} for i, t, x in DOCS)
    callback = IndexRefreshCallback(retriever, every_n_steps=1, swap_delay_steps=1, batch_size=1, max_length=32)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    callback.on_step_end(args, _state(1), None)
    assert callback.running
    callback.on_step_end(args, _state(2), None)  # waits, swaps, starts the next one
    assert callback.refreshes == [(1, 2)] and callback.history[0]["waited_seconds"] > 0
    callback.on_train_end(args, _state(2), None)
    assert callback.refreshes == [(1, 2), (2, 2)]

    retriever.documents = None  # the worker cannot look the texts up: the thread fails
    callback.on_step_end(args, _state(3), None)
    with pytest.raises(RuntimeError, match="background index refresh failed on this rank"):
        callback.on_step_end(args, _state(4), None)


def test_refresh_device_is_a_spare_gpu_or_the_training_device():
    cpu, gpu0 = torch.device("cpu"), torch.device("cuda", 0)
    assert refresh_device(cpu, 0, 1, 0) == cpu
    assert refresh_device(gpu0, 1, 1, 0) == gpu0  # no spare GPU: the training device, not the CPU
    assert refresh_device(gpu0, 2, 1, 0) == torch.device("cuda", 1)
    assert refresh_device(torch.device("cuda", 1), 4, 2, 1) == torch.device("cuda", 3)  # 2 ranks, 2 spares


# ----- Trainer: checkpoints and resume ----------------------------------------------------------------------------


class ICTModel(nn.Module):
    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask, doc_input_ids, doc_attention_mask):
        query = self.embedder.embed_queries(input_ids, attention_mask)
        docs = self.embedder.embed_documents(doc_input_ids, doc_attention_mask)
        return {"loss": ict_loss(query, docs)}


def ict_dataset(tokenizer) -> Dataset:
    examples = ict_examples([d[2] for d in DOCS], seed=0)
    q = tokenizer([e["query"] for e in examples], padding="max_length", max_length=24, truncation=True)
    d = tokenizer([e["context"] for e in examples], padding="max_length", max_length=40, truncation=True)
    columns = {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"], "doc_input_ids": d["input_ids"],
               "doc_attention_mask": d["attention_mask"]}  # fmt: skip
    return Dataset.from_dict(columns).with_format("torch")


class CorpusEdits(TrainerCallback):
    """Documents added at steps 1 and 3 (the second while a refresh is in flight), one removed at step 5."""

    def __init__(self, retriever):
        self.retriever = retriever

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step in (1, 3):
            name = {1: "athens", 3: "bern"}[step]
            doc = {"id": [f"new{step}"], "title": [name], "text": [f"{name} is a capital."]}
            self.retriever.add_documents(Dataset.from_dict(doc), max_length=32)
        if step == 5:
            self.retriever.remove_documents(["d0"])
        return control


def _train(retriever, output: Path, resume: bool = False) -> IndexRefreshCallback:
    refresh = IndexRefreshCallback(retriever, every_n_steps=2, batch_size=4, max_length=32)
    args = TrainingArguments(output_dir=str(output), max_steps=8, per_device_train_batch_size=3, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=3, logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip
    trainer = Trainer(model=ICTModel(retriever.embedder), args=args, train_dataset=ict_dataset(retriever.tokenizer),
                      callbacks=[CorpusEdits(retriever), refresh])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume or None)
    return refresh


def test_refresh_state_is_checkpointed_and_a_resumed_run_ends_with_the_same_index(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    full = _train(retriever, tmp_path / "full")
    assert full.refreshes == [(2, 4), (4, 6), (6, 8)]
    saved = tmp_path / "full" / "checkpoint-3" / "index_refresh"
    assert {p.name for p in saved.iterdir()} >= {"refresh_state.json", "index", "documents", "snapshot.safetensors"}
    pending = json.loads((saved / "refresh_state.json").read_text())["pending"]
    assert pending["start"] == 2 and pending["swap"] == 4 and pending["changes"] == [["add", ["new3"]]]

    # Resume from checkpoint-3 with a retriever as it was before training (initial index, initial documents).
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    fresh, _ = make_retriever(tmp_path)
    resumed = _train(fresh, tmp_path / "resumed", resume=True)
    assert resumed.refreshes == full.refreshes
    assert fresh.index.ids == retriever.index.ids == ["d1", "d2", "d3", "d4", "d5", "new1", "new3"]
    torch.testing.assert_close(fresh.index.embeddings, retriever.index.embeddings, rtol=1e-5, atol=1e-6)
    assert fresh.retrieve(["bern"], k=7, max_length=32).mask.all()  # the documents came back too


# ----- torch.distributed: 1/N each, one assembly, the same step, the same index -----------------------------------


def test_two_gloo_ranks_embed_half_each_and_swap_identical_indexes_at_the_same_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "tests" / "refresh_ddp_worker.py"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = {(run, rank): json.loads((tmp_path / f"run{run}-rank{rank}.json").read_text()) for run in (0, 1)
            for rank in (0, 1)}  # fmt: skip
    for (run, rank), result in runs.items():
        assert result["off_main_thread_collectives"] == [], (run, rank)
        assert result["refreshes"] == [[2, 4], [4, 6]], (run, rank)
        assert [h["embedded_here"] for h in result["history"]] == [len(DOCS) // 2] * 2, (run, rank)
        assert result["settings"]["chunk_size"] == 5
    digests = {result["index_digest"] for result in runs.values()}
    assert len(digests) == 1  # every rank, both runs with the same seed


def test_an_abandoned_refresh_stops_at_its_next_batch(tmp_path):
    retriever, _ = make_retriever(tmp_path)
    retriever.documents = _SlowDocuments({"id": i, "title": t, "text": x} for i, t, x in DOCS)
    before = retriever.index
    callback = IndexRefreshCallback(retriever, every_n_steps=1, batch_size=1, max_length=32, wait_on_train_end=False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    callback.on_step_end(args, _state(1), None)
    thread = callback._pending.thread
    callback.on_train_end(args, _state(1), None)  # training is over: the refresh is dropped, not waited for
    thread.join(timeout=5)
    assert not thread.is_alive() and retriever.index is before and callback.refreshes == []
