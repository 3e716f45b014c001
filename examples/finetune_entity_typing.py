"""Fine-tune entity typing (Open Entity / FIGER): '@' around the mention, multi-label types at the marker.

    python examples/finetune_entity_typing.py --base_model roberta-large --train_file OpenEntity/train.json \
        --validation_file OpenEntity/dev.json --load_adapters factual=fac-adapter linguistic=lin-adapter --regime paper \
        --output_dir et --do_train --do_eval --learning_rate 1e-5 --max_length 256

Regimes: paper (base trained, adapters frozen), adapters (base frozen, adapters trained), lora (LoRA on the
base's attention, adapters frozen).
"""

from __future__ import annotations

from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForEntityTyping
from hf_kadapter.kadapter.data import (
    KAdapterDataCollator,
    build_label_vocab,
    load_entity_typing,
    preprocess_entity_typing,
)
from hf_kadapter.kadapter.metrics import entity_typing_compute_metrics
from hf_kadapter.kadapter.recipes import FineTuningArguments, build_finetuning_model, parse_arguments, run


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, training_args = parse_arguments(FineTuningArguments, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    train = data_args.limit(load_entity_typing(data_args.train_file, on_error=data_args.on_error))
    evaluation = (
        load_entity_typing(data_args.validation_file, on_error=data_args.on_error)
        if data_args.validation_file
        else None
    )
    label2id = build_label_vocab(*[d for d in (train, evaluation) if d is not None], field="labels")

    def features(dataset):
        return preprocess_entity_typing(
            dataset, tokenizer, label2id, max_length=args.max_length, on_error=data_args.on_error
        )

    model = build_finetuning_model(
        KAdapterForEntityTyping,
        args,
        id2label={i: label for label, i in label2id.items()},
        label2id=label2id,
        problem_type="multi_label_classification",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features(train),
        eval_dataset=features(evaluation) if evaluation is not None else None,
        data_collator=KAdapterDataCollator(tokenizer, label_kind="multi_hot"),
        compute_metrics=entity_typing_compute_metrics(),
    )
    run(trainer, training_args)
    return trainer


if __name__ == "__main__":
    main()
