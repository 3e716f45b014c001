"""Fine-tune multiple choice (CosmosQA): one logit per (context, question + answer) from its first token.

    python examples/finetune_multiple_choice.py --base_model roberta-large --train_file cosmosqa/train.jsonl \
        --validation_file cosmosqa/valid.jsonl --load_adapters factual=fac-adapter linguistic=lin-adapter --regime paper \
        --output_dir cosmosqa --do_train --do_eval --learning_rate 1e-5 --max_length 256
"""

from __future__ import annotations

from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForMultipleChoice
from hf_kadapter.kadapter.data import KAdapterDataCollator, load_multiple_choice, preprocess_multiple_choice
from hf_kadapter.kadapter.metrics import accuracy_compute_metrics
from hf_kadapter.kadapter.recipes import FineTuningArguments, build_finetuning_model, parse_arguments, run


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, training_args = parse_arguments(FineTuningArguments, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)

    def features(path: str, limit: bool = False):
        records = load_multiple_choice(path, on_error=data_args.on_error)
        records = data_args.limit(records) if limit else records
        return preprocess_multiple_choice(records, tokenizer, max_length=args.max_length)

    model = build_finetuning_model(KAdapterForMultipleChoice, args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features(data_args.train_file, limit=True),
        eval_dataset=features(data_args.validation_file) if data_args.validation_file else None,
        data_collator=KAdapterDataCollator(tokenizer, label_kind="scalar"),
        compute_metrics=accuracy_compute_metrics(),
    )
    run(trainer, training_args)
    return trainer


if __name__ == "__main__":
    main()
