"""Run by tests/test_retrieval_refresh.py under `torchrun --nproc_per_node 2` (gloo on CPU): two identical seeded
Trainer runs with IndexRefreshCallback; each rank writes what it saw to <out>/run{run}-rank{rank}.json."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_retrieval_realm import make_retriever  # noqa: E402
from test_retrieval_refresh import ICTModel, ict_dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_kadapter.retrieval.index import DocumentIndex  # noqa: E402
from hf_kadapter.retrieval.refresh import IndexRefreshCallback  # noqa: E402

OFF_MAIN: list[str] = []


def _watch(name: str) -> None:
    """Record any collective called from a thread other than the main one (the refresh thread must make none)."""
    original = getattr(dist, name)

    def watched(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            OFF_MAIN.append(name)
        return original(*args, **kwargs)

    setattr(dist, name, watched)


for _name in ("all_gather_object", "all_reduce", "barrier", "broadcast_object_list", "all_gather", "broadcast"):
    _watch(_name)


def main(out: Path) -> None:
    for run in (0, 1):
        args = TrainingArguments(output_dir=str(out / f"run{run}"), max_steps=6, per_device_train_batch_size=3,
                                 learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                                 ddp_backend="gloo", seed=0)  # fmt: skip
        rank = dist.get_rank()
        folder = out / f"tok-{run}-{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        retriever, corpus = make_retriever(folder)
        old = retriever.index
        retriever.index = DocumentIndex(old.ids, old.embeddings, chunk_size=5, documents=corpus)
        refresh = IndexRefreshCallback(retriever, every_n_steps=2, batch_size=2, max_length=32)
        trainer = Trainer(model=ICTModel(retriever.embedder), args=args, train_dataset=ict_dataset(retriever.tokenizer),
                          callbacks=[refresh])  # fmt: skip
        trainer.train()
        index = retriever.index
        digest = hashlib.sha256(json.dumps(index.ids).encode() + index.embeddings.numpy().tobytes()).hexdigest()
        result = {
            "refreshes": refresh.refreshes,
            "history": refresh.history,
            "settings": index.settings(),
            "index_digest": digest,
            "off_main_thread_collectives": OFF_MAIN,
        }
        (out / f"run{run}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
