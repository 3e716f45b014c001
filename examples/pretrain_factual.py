"""Pretrain a factual adapter: relation classification over marked entity pairs (T-REx records), base frozen.

    python examples/pretrain_factual.py --base_model roberta-large --train_file trex_train.json \
        --output_dir fac-adapter --do_train --per_device_train_batch_size 64 --learning_rate 5e-5 \
        --num_train_epochs 5 --max_length 64 --tap_layers 0,11,22

Adapters given with --load_adapters come along frozen: the new adapter is added without disturbing them.
"""

from __future__ import annotations

from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForFactualPretraining
from hf_kadapter.kadapter.data import KAdapterDataCollator, build_label_vocab, load_factual, preprocess_factual
from hf_kadapter.kadapter.metrics import accuracy_compute_metrics
from hf_kadapter.kadapter.recipes import (
    PretrainingArguments,
    build_pretraining_model,
    parse_arguments,
    run,
    with_feature_cache,
)


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, training_args = parse_arguments(PretrainingArguments, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    train = data_args.limit(load_factual(data_args.train_file, on_error=data_args.on_error))
    evaluation = (
        load_factual(data_args.validation_file, on_error=data_args.on_error) if data_args.validation_file else None
    )
    label2id = build_label_vocab(*[d for d in (train, evaluation) if d is not None], field="relation")

    def features(dataset):
        return preprocess_factual(dataset, tokenizer, label2id, max_length=args.max_length, on_error=data_args.on_error)

    model = build_pretraining_model(
        KAdapterForFactualPretraining,
        args,
        args.adapter_name or "factual",
        id2label={i: label for label, i in label2id.items()},
        label2id=label2id,
    )
    collator = KAdapterDataCollator(tokenizer, label_kind="scalar")
    train_features, collator = with_feature_cache(model, features(train), collator, args, training_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=features(evaluation) if evaluation is not None else None,
        data_collator=collator,
        compute_metrics=accuracy_compute_metrics(),
    )
    run(trainer, training_args)
    return trainer


if __name__ == "__main__":
    main()
