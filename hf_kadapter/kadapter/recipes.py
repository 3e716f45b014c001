"""Shared pieces of the K-Adapter training recipes (examples/*.py): arguments, model building, regimes, running.

The scripts stay short and standard (HfArgumentParser + TrainingArguments + Trainer); what they share lives here
so that every recipe builds models, applies fine-tuning regimes, checks its output folder, logs and resumes the
same way. Pretraining scripts parse `PretrainingArguments` (the new adapter, the feature cache), fine-tuning scripts
`FineTuningArguments` (the regime, LoRA): each script offers only the flags it uses.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
import sys
import zipfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from ..utils.io import DamagedFileError, read_json, recover_folder, safetensors_problem, write_json_atomic
from .configuration_kadapter import KnowledgeAdapterConfig, default_tap_layers
from .modeling_kadapter import KAdapterPreTrainedModel, load_base_model

logger = logging.getLogger(__name__)

REGIMES = ("paper", "adapters", "lora", "probe")
HALF_DTYPES = ("bfloat16", "float16")
RUN_RECORD = "run_arguments.json"
# TrainingArguments that change what a run trains (the others: logging, saving, evaluation, paths, reporting ...).
TRAINING_FIELDS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "optim",
    "optim_args",
    "label_smoothing_factor",
    "bf16",
    "fp16",
)


@dataclass
class ModelArguments:
    """Which base, which adapters trained before, and the task head (every recipe)."""

    base_model: str = field(metadata={"help": "Base encoder: any BERT-like or RoBERTa-like Hub id or folder."})
    load_adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "Adapters trained before, loaded frozen: FOLDER or NAME=FOLDER (several allowed)."},
    )
    classifier_dropout: float | None = field(
        default=None, metadata={"help": "Dropout of the task head (default: the base's hidden dropout)."}
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (after markers)."})
    base_dtype: str = field(
        default="float32",
        metadata={
            "help": "Keep the frozen base in this dtype (float32, bfloat16, float16) while what trains stays float32: "
            "half the base's memory, faster where half-precision matmuls are (see docs/performance.md for the "
            "accuracy cost). Only for a frozen base (pretraining, regimes 'adapters' and 'probe')."
        },
    )

    def __post_init__(self) -> None:
        if self.base_dtype not in HALF_DTYPES + ("float32",):
            raise ValueError(f"--base_dtype {self.base_dtype!r} is not one of float32, bfloat16, float16.")

    def adapter_sources(self) -> list[tuple[str | None, str]]:
        sources: list[tuple[str | None, str]] = []
        for entry in self.load_adapters:
            if "=" in entry and not os.path.exists(entry):
                name, folder = entry.split("=", 1)
                sources.append((name, folder))
            else:
                sources.append((None, entry))
        return sources


@dataclass
class PretrainingArguments(ModelArguments):
    """The new adapter a pretraining recipe trains (base frozen), and the frozen-base feature cache."""

    adapter_name: str | None = field(
        default=None,
        metadata={"help": "Name of the adapter to pretrain (default: factual/linguistic)."},
    )
    tap_layers: str | None = field(
        default=None,
        metadata={"help": "New adapter's tapped hidden_states, e.g. '0,11,22' (default: scaled from those)."},
    )
    adapter_hidden_size: int = field(default=768, metadata={"help": "New adapter's hidden size."})
    adapter_layers: int = field(default=2, metadata={"help": "Transformer layers per adapter layer."})
    adapter_heads: int = field(default=12, metadata={"help": "Attention heads of the adapter's layers."})
    adapter_intermediate_size: int = field(default=3072, metadata={"help": "FFN size of the adapter's layers."})
    adapter_input_mode: str = field(default="sum", metadata={"help": "'sum' (official code) or 'concat' (paper)."})
    adapter_dropout: float = field(default=0.1, metadata={"help": "Dropout inside the new adapter's layers."})
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache the frozen base's hidden states here and reuse them every epoch."},
    )
    feature_cache_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the feature cache stores: float32 (the adapter trains exactly as without a cache), "
            "float16 or bfloat16 (half the disk and the reads; float16 refuses states beyond its range)."
        },
    )
    # Arguments that do not change what a run trains (left out of its record in output_dir).
    not_defining_run: ClassVar[tuple[str, ...]] = ("feature_cache_dir",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_cache_dtype not in HALF_DTYPES + ("float32",):
            raise ValueError(
                f"--feature_cache_dtype {self.feature_cache_dtype!r} is not one of float32, bfloat16, float16."
            )
        if self.feature_cache_dtype != "float32" and not self.feature_cache_dir:
            raise ValueError(
                f"--feature_cache_dtype {self.feature_cache_dtype} says how the feature cache stores the base's "
                "hidden states, but there is no cache: add --feature_cache_dir DIR (or drop the flag)."
            )

    def adapter_config(self, num_hidden_layers: int) -> KnowledgeAdapterConfig:
        taps = (
            [int(t) for t in self.tap_layers.split(",")] if self.tap_layers else default_tap_layers(num_hidden_layers)
        )
        return KnowledgeAdapterConfig(
            tap_layers=taps,
            num_layers=self.adapter_layers,
            hidden_size=self.adapter_hidden_size,
            num_attention_heads=self.adapter_heads,
            intermediate_size=self.adapter_intermediate_size,
            input_mode=self.adapter_input_mode,
            hidden_dropout_prob=self.adapter_dropout,
            attention_probs_dropout_prob=self.adapter_dropout,
        )


@dataclass
class FineTuningArguments(ModelArguments):
    """What trains on a downstream task: the regime, the fusion of the loaded adapters, LoRA."""

    regime: str = field(
        default="paper",
        metadata={
            "help": "Fine-tuning regime: 'paper' (base trained, adapters frozen), 'adapters' (base frozen, adapters "
            "trained), 'lora' (LoRA on the base's attention, adapters frozen), 'probe' (base and adapters frozen: "
            "only the fusion and the head train, which measures what the adapters know)."
        },
    )
    fusion: str = field(default="concat", metadata={"help": "How adapter outputs are combined: 'concat' or 'add'."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (regime 'lora')."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (regime 'lora')."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (regime 'lora')."})
    lora_target_modules: str = field(default="query,value", metadata={"help": "Base attention modules LoRA wraps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regime not in REGIMES:
            raise ValueError(f"--regime {self.regime!r} is not one of {REGIMES}.")
        if self.base_dtype != "float32" and self.regime in ("paper", "lora"):
            raise ValueError(
                f"--base_dtype {self.base_dtype} keeps the base in half precision, which only a frozen base can be; "
                f"the regime {self.regime!r} trains it (its weights or LoRA on them). Use --regime adapters or probe, "
                "or train the base in mixed precision with --bf16 instead."
            )


@dataclass
class DataArguments:
    """Where the data is and what to do with malformed records."""

    train_file: str | None = field(default=None, metadata={"help": "Training records (JSON or JSON Lines)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation records."})
    skip_malformed: bool = field(
        default=False, metadata={"help": "Skip and count malformed records instead of stopping at the first one."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    not_defining_run: ClassVar[tuple[str, ...]] = ("validation_file",)

    @property
    def on_error(self) -> str:
        return "skip" if self.skip_malformed else "raise"

    def limit(self, dataset):
        return (
            dataset
            if self.max_train_samples is None
            else dataset.select(range(min(self.max_train_samples, len(dataset))))
        )


@dataclass
class RunArguments:
    """What to do with an output_dir that already holds a run."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir holding a run with other arguments (deletes its checkpoints)."},
    )


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current sys.stdout, not the one of its creation (notebooks and tests swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(training_args: TrainingArguments) -> None:
    """The package's INFO messages (adapters loaded, what trains, resumed or refused) on stdout, from the main
    process only, as transformers' example scripts show theirs."""
    package = logging.getLogger("hf_kadapter")
    if not any(isinstance(handler, _StdoutHandler) for handler in package.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    package.setLevel(logging.INFO if training_args.should_log else logging.WARNING)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else str(value)


def run_record(parsed: tuple, training_args: TrainingArguments) -> dict[str, Any]:
    """The arguments that define what a run trains: the script's own (but their `not_defining_run`) and
    TRAINING_FIELDS."""
    record = {
        f.name: getattr(arguments, f.name)
        for arguments in parsed
        for f in fields(arguments)
        if f.name not in getattr(arguments, "not_defining_run", ())
    }
    record.update({name: getattr(training_args, name) for name in TRAINING_FIELDS if hasattr(training_args, name)})
    record["arguments_of"] = [type(arguments).__name__ for arguments in parsed]  # which recipe
    return json.loads(json.dumps(record, default=_plain))


def _defaults(parsed: tuple) -> dict[str, Any]:
    """Each recipe argument's default, as the run record writes values."""
    found = {
        f.name: f.default
        for arguments in parsed
        for f in fields(arguments)
        if f.default is not MISSING
    }
    return json.loads(json.dumps(found, default=_plain))


def check_output_dir(parsed: tuple, training_args: TrainingArguments, overwrite: bool = False) -> None:
    """Before training into an output_dir that holds a run: resume it when the arguments are the same, refuse
    (naming the changed arguments) when they are not, start over with --overwrite_output_dir. Then record them.

    Why: a rerun resumes from the last checkpoint; with another learning rate it would silently train nothing more
    (the run is finished) and overwrite the results, with other --tap_layers it would crash in the optimizer load.
    """
    if not training_args.do_train:
        return
    with training_args.main_process_first(desc="checking the output_dir"):  # replicas see the main process's verdict
        _check_output_dir(parsed, training_args, overwrite)


def _check_output_dir(parsed: tuple, training_args: TrainingArguments, overwrite: bool) -> None:
    folder = Path(training_args.output_dir)
    current = run_record(parsed, training_args)
    trained = folder.is_dir() and (bool(_checkpoints(folder)) or (folder / "trainer_state.json").exists())
    if trained and not overwrite and training_args.resume_from_checkpoint is None:
        path = folder / RUN_RECORD
        previous = read_json(path) if path.is_file() else None
        if previous is None:
            changed = ["(no record of the arguments of the run there)"]
        else:
            defaults = _defaults(parsed)
            changed = [
                f"--{name}: {previous.get(name)!r} -> {current.get(name)!r}"
                for name in sorted(set(previous) | set(current))
                if previous.get(name) != current.get(name)
                # a flag newer than the recorded run, left at its default, changes nothing in it
                and not (name not in previous and name in defaults and defaults[name] == current.get(name))
            ]
        if changed:
            raise ValueError(
                f"{folder} holds a training run with other arguments: {'; '.join(changed)}. Resuming it would "
                "continue that run, not start this one: use a new --output_dir, or pass --overwrite_output_dir to "
                "start over there (its checkpoints are deleted)."
            )
        logger.info("%s holds a run with the same arguments: resuming it from its last checkpoint.", folder)
    elif trained and overwrite and training_args.should_save:
        logger.warning("--overwrite_output_dir: deleting the checkpoints and results of the run in %s.", folder)
        # Trainer's own checkpoint-<step> folders and result files only: a "checkpoint-best" copied there is not.
        checkpoints = [Path(path) for _, path in _checkpoints(folder)]
        for item in [*checkpoints, folder / "trainer_state.json", *folder.glob("*_results.json")]:
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink(missing_ok=True)
    if training_args.should_save:
        write_json_atomic(folder / RUN_RECORD, current, sort_keys=True)


def parse_arguments(args_class: type, *extra: type, argv: list[str] | None = None) -> tuple:
    """(args_class instance, DataArguments, *extra, TrainingArguments) from the command line.

    Also: the package's logs go to stdout, the output_dir is checked (see check_output_dir), and everything is
    seeded before any model is built, so single-process and distributed runs start from the same weights.
    """
    parser = HfArgumentParser((args_class, DataArguments, *extra, TrainingArguments, RunArguments))
    *parsed, run_args = parser.parse_args_into_dataclasses(args=argv)
    training_args = parsed[-1]
    setup_logging(training_args)
    check_output_dir(tuple(parsed[:-1]), training_args, overwrite=run_args.overwrite_output_dir)
    set_seed(training_args.seed)
    return tuple(parsed)


def _load_adapters(model: KAdapterPreTrainedModel, args: ModelArguments, freeze: bool) -> None:
    """Load every --load_adapters entry. A folder holding several adapters (a linguistic adapter pretrained with
    the factual one alongside) may repeat an adapter already loaded: identical weights are skipped, different
    weights under one name are refused (rename with NAME=FOLDER)."""
    for name, folder in args.adapter_sources():
        source = model.config_class.from_pretrained(folder)
        for adapter in [name] if name else list(source.adapters):
            if adapter not in model.config.adapters:
                model.load_adapter(folder, name=adapter, freeze=freeze)
                continue
            probe = model.load_adapter(folder, name=adapter, adapter_name="_kadapter_probe")
            existing = model._core().adapters[adapter].state_dict()
            same = all(torch.equal(v, existing[k]) for k, v in probe.state_dict().items())
            model.delete_adapter("_kadapter_probe")
            if not same:
                raise ValueError(
                    f"Two different adapters are named {adapter!r} (the second from {folder}): load one of them "
                    f"under another name with --load_adapters NEWNAME={folder}."
                )
            logger.info("adapter %r from %s is already loaded (identical weights): skipped", adapter, folder)


def build_pretraining_model(
    head_class: type[KAdapterPreTrainedModel], args: PretrainingArguments, adapter_name: str, **config_kwargs: Any
) -> KAdapterPreTrainedModel:
    """A pretraining head training one new adapter; adapters given with --load_adapters come along frozen
    (continual knowledge: the new adapter does not disturb them)."""
    base = load_base_model(args.base_model)
    model = head_class.from_base(
        base, adapters={}, pretraining_adapter=adapter_name, classifier_dropout=args.classifier_dropout, **config_kwargs
    )
    model.config.base_model_name_or_path = args.base_model
    _load_adapters(model, args, freeze=True)
    adapter = model.add_adapter(adapter_name, args.adapter_config(base.config.num_hidden_layers))
    _cast_base(model, args)
    logger.info(
        "pretraining the adapter %r (%s parameters) on the frozen base %s; frozen adapters: %s",
        adapter_name,
        f"{sum(p.numel() for p in adapter.parameters()):,}",
        args.base_model,
        model.config.frozen_adapters or "none",
    )
    return model


def build_finetuning_model(
    head_class: type[KAdapterPreTrainedModel], args: FineTuningArguments, **config_kwargs: Any
) -> KAdapterPreTrainedModel:
    """A task head over the base with the given pretrained adapters, in the chosen fine-tuning regime."""
    base = load_base_model(args.base_model)
    model = head_class.from_base(
        base, adapters={}, fusion=args.fusion, classifier_dropout=args.classifier_dropout, **config_kwargs
    )
    model.config.base_model_name_or_path = args.base_model
    _load_adapters(model, args, freeze=True)
    apply_regime(model, args)
    _cast_base(model, args)
    return model


def _cast_base(model: KAdapterPreTrainedModel, args: ModelArguments) -> None:
    if args.base_dtype != "float32":
        model.cast_base(args.base_dtype)
        logger.info("the frozen base runs in %s; what trains stays %s", args.base_dtype, model._core()._trainable_dtype)


def apply_regime(model: KAdapterPreTrainedModel, args: FineTuningArguments) -> None:
    """paper: base trained, adapters frozen (the paper and the official code); adapters: base frozen, adapters
    trained; lora: LoRA on the base's attention, base weights and adapters frozen; probe: base and adapters frozen.
    Fusion and head always train."""
    if args.regime == "paper":
        model.unfreeze_base()
        model.freeze_adapter()
    elif args.regime == "adapters":
        model.freeze_base()
        model.unfreeze_adapter()
    elif args.regime == "probe":
        model.freeze_base()
        model.freeze_adapter()
    else:
        model.freeze_base()
        model.freeze_adapter()
        model.add_base_lora(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=tuple(args.lora_target_modules.split(",")),
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("regime %s: %s of %s parameters train", args.regime, f"{trainable:,}", f"{total:,}")


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_problem(folder: str | os.PathLike, require_optimizer: bool = False) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (None when it is complete).

    Trainer writes the model, then optimizer/scheduler/scaler/RNG states, then trainer_state.json, each in place; a
    kill during that leaves a folder without (or with half of) trainer_state.json, or with a file cut short. So a
    checkpoint is complete when trainer_state.json parses, the model weights are there and whole (safetensors
    headers agree with file sizes; an interrupted K-Adapter save is finished first), and every torch file
    (optimizer.pt, scheduler.pt, rng_state*.pth ...) is a whole zip archive. Nothing is unpickled.
    `require_optimizer` (a run that saves optimizer states, i.e. not save_only_model) also needs optimizer.pt and the
    RNG states, without which the resumed run would not be the uninterrupted one.
    """
    folder = Path(folder)
    try:
        recover_folder(folder)
        state = read_json(folder / TRAINER_STATE_NAME)
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME} (the save was interrupted)"
    except (DamagedFileError, OSError) as error:
        return str(error)
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE_NAME} has no global_step"
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(read_json(index)["weight_map"].values())
        except (DamagedFileError, KeyError, TypeError, AttributeError) as error:
            return f"its weight index cannot be read ({error})"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"weight shards {missing[:3]} are missing"
    if not weights and not any(folder.glob("*.bin")):
        return "no model weights"
    for path in weights:
        problem = safetensors_problem(path)
        if problem is not None:
            return f"{path.name}: {problem}"
    if require_optimizer:
        if not (folder / "optimizer.pt").is_file():
            return "no optimizer.pt"
        if not any(folder.glob("rng_state*.pth")):
            return "no rng_state*.pth"
    for path in [*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]:
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a whole torch archive (cut short?)"
    return None


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint-N folders in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.scandir(output_dir):
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry.path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike, require_optimizer: bool = False) -> str | None:
    """The newest checkpoint-N folder in `output_dir` that is complete (see checkpoint_problem); incomplete newer
    ones (a kill during a checkpoint save) are skipped, each named in the log with the reason."""
    for _, path in reversed(_checkpoints(output_dir)):
        problem = checkpoint_problem(path, require_optimizer)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def run(trainer: Trainer, training_args: TrainingArguments) -> dict[str, float]:
    """Train (resuming from the last COMPLETE checkpoint in output_dir, or --resume_from_checkpoint), save, evaluate;
    the metrics are printed and saved (train_results.json, eval_results.json, all_results.json) as in transformers'
    example scripts.

    A kill at any point, during a checkpoint save included, is resumed from the newest checkpoint that is whole (the
    incomplete ones are skipped and logged); the result is the same as an uninterrupted run.
    """
    metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is not None:
            problem = (
                checkpoint_problem(checkpoint, not training_args.save_only_model)
                if os.path.isdir(checkpoint)
                else "it is not a folder"
            )
            if problem is not None:
                raise ValueError(
                    f"--resume_from_checkpoint {checkpoint} cannot be resumed from: {problem}. Pick another "
                    "checkpoint, or leave the option out to resume from the last complete one in output_dir."
                )
        else:
            checkpoint = last_complete_checkpoint(training_args.output_dir, not training_args.save_only_model)
        resumed_step = 0
        if checkpoint is not None:
            logger.info("Resuming from %s.", checkpoint)
            resumed_step = int(read_json(Path(checkpoint) / TRAINER_STATE_NAME)["global_step"])
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.save_state()
        if checkpoint is not None and trainer.state.global_step == resumed_step:
            # Resumed at its last step: nothing trained now, and this session's loss (0.0) and speed are no result.
            logger.info(
                "The run in %s had already trained to step %d: nothing more to train; its training results are kept.",
                training_args.output_dir,
                resumed_step,
            )
            previous = Path(training_args.output_dir) / "train_results.json"
            metrics.update(read_json(previous) if previous.is_file() else {})
        else:
            train_metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()}
            trainer.log_metrics("train", train_metrics)
            trainer.save_metrics("train", train_metrics)
            metrics.update(train_metrics)
    if training_args.do_eval and trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def with_feature_cache(model, features, collator, args: PretrainingArguments, training_args: TrainingArguments):
    """Pretraining: precompute the frozen base's hidden states once (args.feature_cache_dir) and train the adapter
    from them every epoch; without a cache directory, the features and collator are returned as they are."""
    if not args.feature_cache_dir:
        return features, collator
    from .feature_cache import CachedFeatureCollator, build_feature_cache

    cache = build_feature_cache(
        model,
        features,
        args.feature_cache_dir,
        batch_size=training_args.per_device_eval_batch_size,
        dtype=args.feature_cache_dtype,
    )
    return cache.attach(features), CachedFeatureCollator(collator, cache, model=model)
