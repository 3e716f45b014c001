"""Fine-tune extractive QA (SQuAD v1.1 format; SearchQA / Quasar-T converted to it): start/end over tokens.

    python examples/finetune_qa.py --base_model roberta-large --train_file squad/train.json \
        --validation_file squad/dev.json --load_adapters factual=fac-adapter linguistic=lin-adapter --regime paper \
        --output_dir qa --do_train --do_eval --learning_rate 1e-5 --max_length 384

Evaluation predicts spans over the sliding windows, maps them back to the context and reports EM / F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from transformers import AutoTokenizer, Trainer

from hf_kadapter import KAdapterForQuestionAnswering
from hf_kadapter.kadapter.data import (
    KAdapterDataCollator,
    load_squad,
    postprocess_squad_predictions,
    preprocess_squad_eval,
    preprocess_squad_train,
)
from hf_kadapter.kadapter.metrics import load_metric
from hf_kadapter.kadapter.recipes import FineTuningArguments, build_finetuning_model, parse_arguments, run


@dataclass
class QAArguments:
    doc_stride: int = field(default=128, metadata={"help": "Overlap between context windows."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer span, in tokens."})
    not_defining_run: ClassVar[tuple[str, ...]] = ("max_answer_length",)  # evaluation only


def main(argv: list[str] | None = None) -> Trainer:
    args, data_args, qa_args, training_args = parse_arguments(FineTuningArguments, QAArguments, argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    windows = dict(max_length=args.max_length, doc_stride=qa_args.doc_stride)

    train = data_args.limit(load_squad(data_args.train_file, on_error=data_args.on_error))
    model = build_finetuning_model(KAdapterForQuestionAnswering, args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=preprocess_squad_train(train, tokenizer, **windows),
        data_collator=KAdapterDataCollator(tokenizer, label_kind="scalar"),
    )
    do_eval, training_args.do_eval = training_args.do_eval, False  # span evaluation happens below
    run(trainer, training_args)
    if do_eval and data_args.validation_file:
        examples = load_squad(data_args.validation_file, on_error=data_args.on_error)
        features = preprocess_squad_eval(examples, tokenizer, **windows)
        inputs = features.remove_columns([c for c in ("example_id", "offset_mapping") if c in features.column_names])
        start_logits, end_logits = trainer.predict(inputs).predictions[:2]
        answers = postprocess_squad_predictions(
            examples, features, start_logits, end_logits, max_answer_length=qa_args.max_answer_length
        )
        scores = load_metric("squad_em_f1").compute(
            predictions=[{"id": k, "prediction_text": v} for k, v in answers.items()],
            references=[{"id": e["id"], "answers": e["answers"]} for e in examples],
        )
        metrics = {f"eval_{k}": float(v) for k, v in scores.items()}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer


if __name__ == "__main__":
    main()
