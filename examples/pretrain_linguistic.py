"""Pretrain a linguistic adapter: predict each token's dependency head (position), base frozen.

    python examples/pretrain_linguistic.py --base_model roberta-large --train_file bookcorpus_sample.txt \
        --output_dir lin-adapter --do_train --max_length 128 --tap_layers 0,11,22

--train_file is either dependency records (JSON/JSONL {"tokens", "heads"}) or raw text (.txt, one passage per
line) that spaCy's English parser (pip install "hf_kadapter[dependency]") turns into records first; the parsed
records are saved next to the output (dependency_records.jsonl) and reused on the next run.
"""

from __future__ import annotations

import hashlib
import os

import datasets
from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForDependencyPretraining
from hf_kadapter.kadapter.data import (
    KAdapterDataCollator,
    load_dependency_records,
    parse_dependencies,
    preprocess_dependency,
    save_dependency_records,
)
from hf_kadapter.kadapter.metrics import accuracy_compute_metrics, argmax_logits
from hf_kadapter.kadapter.recipes import (
    DataArguments,
    PretrainingArguments,
    build_pretraining_model,
    parse_arguments,
    run,
    with_feature_cache,
)


def load(path: str, data_args: DataArguments, training_args) -> datasets.Dataset:
    if not path.endswith(".txt"):
        return load_dependency_records(path, on_error=data_args.on_error)
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:16]  # an edited text is parsed again
    parsed = os.path.join(training_args.output_dir, f"{os.path.basename(path)}.{digest}.dependency_records.jsonl")
    with training_args.main_process_first(desc="dependency parsing"):  # one process parses, the others reuse it
        if not os.path.exists(parsed):
            with open(path, encoding="utf-8") as handle:
                texts = [line.strip() for line in handle if line.strip()]
            save_dependency_records(parse_dependencies(texts), parsed)
    return load_dependency_records(parsed, on_error=data_args.on_error)


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, training_args = parse_arguments(PretrainingArguments, argv=argv)
    os.makedirs(training_args.output_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    def features(path: str):
        records = load(path, data_args, training_args)
        return preprocess_dependency(records, tokenizer, max_length=args.max_length, on_error=data_args.on_error)

    model = build_pretraining_model(
        KAdapterForDependencyPretraining, args, args.adapter_name or "linguistic", max_head_positions=args.max_length
    )
    collator = KAdapterDataCollator(tokenizer, label_kind="token")
    train_features, collator = with_feature_cache(
        model, data_args.limit(features(data_args.train_file)), collator, args, training_args
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=features(data_args.validation_file) if data_args.validation_file else None,
        data_collator=collator,
        compute_metrics=accuracy_compute_metrics(),  # head-position accuracy over labelled tokens
        preprocess_logits_for_metrics=argmax_logits,  # (B, L, L) logits of batches of other lengths cannot be joined
    )
    run(trainer, training_args)
    return trainer


if __name__ == "__main__":
    main()
