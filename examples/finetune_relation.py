"""Fine-tune relation classification (TACRED): '@' around the subject, '#' around the object.

    python examples/finetune_relation.py --base_model roberta-large --train_file tacred/train.json \
        --validation_file tacred/dev.json --load_adapters factual=fac-adapter linguistic=lin-adapter --regime paper \
        --output_dir tacred --do_train --do_eval --learning_rate 1e-5 --max_length 184

Micro-F1 is computed without the no_relation label, as is standard for TACRED.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForRelationClassification
from hf_kadapter.kadapter.data import KAdapterDataCollator, build_label_vocab, load_relation, preprocess_relation
from hf_kadapter.kadapter.metrics import accuracy_compute_metrics, relation_compute_metrics
from hf_kadapter.kadapter.recipes import FineTuningArguments, build_finetuning_model, parse_arguments, run


@dataclass
class RelationArguments:
    no_relation_label: str = field(default="no_relation", metadata={"help": "The 'no relation' label."})
    no_relation_keep: float = field(
        default=1.0, metadata={"help": "Fraction of no_relation training examples kept (seeded subsampling)."}
    )


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, relation_args, training_args = parse_arguments(FineTuningArguments, RelationArguments, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    train = data_args.limit(
        load_relation(
            data_args.train_file,
            no_relation_keep=relation_args.no_relation_keep,
            no_relation_label=relation_args.no_relation_label,
            seed=training_args.seed,
            on_error=data_args.on_error,
        )
    )
    evaluation = (
        load_relation(data_args.validation_file, on_error=data_args.on_error) if data_args.validation_file else None
    )
    label2id = build_label_vocab(*[d for d in (train, evaluation) if d is not None], field="relation")

    def features(dataset):
        return preprocess_relation(
            dataset, tokenizer, label2id, max_length=args.max_length, on_error=data_args.on_error
        )

    model = build_finetuning_model(
        KAdapterForRelationClassification, args, id2label={i: label for label, i in label2id.items()}, label2id=label2id
    )
    no_relation = label2id.get(relation_args.no_relation_label)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features(train),
        eval_dataset=features(evaluation) if evaluation is not None else None,
        data_collator=KAdapterDataCollator(tokenizer, label_kind="scalar"),
        compute_metrics=relation_compute_metrics(no_relation)
        if no_relation is not None
        else accuracy_compute_metrics(),
    )
    run(trainer, training_args)
    return trainer


if __name__ == "__main__":
    main()
