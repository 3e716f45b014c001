"""Shared pieces of the K-Adapter training recipes (examples/*.py): arguments, model building, regimes, running.

The scripts stay short and standard (HfArgumentParser + TrainingArguments + Trainer); what they share lives here
so that every recipe builds models, applies fine-tuning regimes and resumes the same way.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from ..utils.io import DamagedFileError, read_json, recover_folder, safetensors_problem, write_json_atomic
from .configuration_kadapter import KnowledgeAdapterConfig, default_tap_layers
from .modeling_kadapter import KAdapterPreTrainedModel, load_base_model

logger = logging.getLogger(__name__)

REGIMES = ("paper", "adapters", "lora")


@dataclass
class KAdapterArguments:
    """Which base, which adapters, and how to train them."""

    base_model: str = field(metadata={"help": "Base encoder: any BERT-like or RoBERTa-like Hub id or folder."})
    adapter_name: str | None = field(
        default=None,
        metadata={"help": "Name of the adapter a pretraining recipe trains (default: factual/linguistic)."},
    )
    load_adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "Adapters trained before, loaded frozen: FOLDER or NAME=FOLDER (several allowed)."},
    )
    regime: str = field(
        default="paper",
        metadata={
            "help": "Fine-tuning regime: 'paper' (base trained, adapters frozen), 'adapters' (base frozen, adapters "
            "trained), 'lora' (LoRA on the base's attention, adapters frozen)."
        },
    )
    fusion: str = field(default="concat", metadata={"help": "How adapter outputs are combined: 'concat' or 'add'."})
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
    classifier_dropout: float | None = field(
        default=None, metadata={"help": "Dropout of the task head (default: the base's hidden dropout)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (regime 'lora')."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (regime 'lora')."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (regime 'lora')."})
    lora_target_modules: str = field(default="query,value", metadata={"help": "Base attention modules LoRA wraps."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example (after markers)."})

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"--regime {self.regime!r} is not one of {REGIMES}.")

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
class DataArguments:
    """Where the data is and what to do with malformed records."""

    train_file: str | None = field(default=None, metadata={"help": "Training records (JSON or JSON Lines)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation records."})
    skip_malformed: bool = field(
        default=False, metadata={"help": "Skip and count malformed records instead of stopping at the first one."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Pretraining only: cache the frozen base's hidden states here and reuse them every epoch."},
    )

    @property
    def on_error(self) -> str:
        return "skip" if self.skip_malformed else "raise"

    def limit(self, dataset):
        return (
            dataset
            if self.max_train_samples is None
            else dataset.select(range(min(self.max_train_samples, len(dataset))))
        )


def parse_arguments(*extra: type, argv: list[str] | None = None) -> tuple:
    """(KAdapterArguments, DataArguments, *extra, TrainingArguments) from the command line; seeds everything
    before any model is built, so single-process and distributed runs start from the same weights."""
    parser = HfArgumentParser((KAdapterArguments, DataArguments, *extra, TrainingArguments))
    parsed = parser.parse_args_into_dataclasses(args=argv)
    set_seed(parsed[-1].seed)
    return parsed


def _load_adapters(model: KAdapterPreTrainedModel, args: KAdapterArguments, freeze: bool) -> None:
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
    head_class: type[KAdapterPreTrainedModel], args: KAdapterArguments, adapter_name: str, **config_kwargs: Any
) -> KAdapterPreTrainedModel:
    """A pretraining head training one new adapter; adapters given with --load_adapters come along frozen
    (continual knowledge: the new adapter does not disturb them)."""
    base = load_base_model(args.base_model)
    model = head_class.from_base(
        base, adapters={}, pretraining_adapter=adapter_name, classifier_dropout=args.classifier_dropout, **config_kwargs
    )
    model.config.base_model_name_or_path = args.base_model
    _load_adapters(model, args, freeze=True)
    model.add_adapter(adapter_name, args.adapter_config(base.config.num_hidden_layers))
    return model


def build_finetuning_model(
    head_class: type[KAdapterPreTrainedModel], args: KAdapterArguments, **config_kwargs: Any
) -> KAdapterPreTrainedModel:
    """A task head over the base with the given pretrained adapters, in the chosen fine-tuning regime."""
    base = load_base_model(args.base_model)
    model = head_class.from_base(
        base, adapters={}, fusion=args.fusion, classifier_dropout=args.classifier_dropout, **config_kwargs
    )
    model.config.base_model_name_or_path = args.base_model
    _load_adapters(model, args, freeze=True)
    apply_regime(model, args)
    return model


def apply_regime(model: KAdapterPreTrainedModel, args: KAdapterArguments) -> None:
    """paper: base trained, adapters frozen (the paper and the official code); adapters: base frozen, adapters
    trained; lora: LoRA on the base's attention, base weights and adapters frozen. Fusion and head always train."""
    if args.regime == "paper":
        model.unfreeze_base()
        model.freeze_adapter()
    elif args.regime == "adapters":
        model.freeze_base()
        model.unfreeze_adapter()
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


def last_complete_checkpoint(output_dir: str | os.PathLike, require_optimizer: bool = False) -> str | None:
    """The newest checkpoint-N folder in `output_dir` that is complete (see checkpoint_problem); incomplete newer
    ones (a kill during a checkpoint save) are skipped, each named in the log with the reason."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for entry in os.scandir(output_dir):
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry.path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path, require_optimizer)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def run(trainer: Trainer, training_args: TrainingArguments) -> dict[str, float]:
    """Train (resuming from the last COMPLETE checkpoint in output_dir, or --resume_from_checkpoint), save, evaluate.

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
        if checkpoint is not None:
            logger.info("Resuming from %s.", checkpoint)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.save_state()
        metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()})
    if training_args.do_eval and trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(training_args.output_dir, "all_results.json"), metrics, sort_keys=True)
    return metrics


def with_feature_cache(model, features, collator, data_args: DataArguments, training_args: TrainingArguments):
    """Pretraining: precompute the frozen base's hidden states once (data_args.feature_cache_dir) and train the
    adapter from them every epoch; without a cache directory, the features and collator are returned as they are."""
    if not data_args.feature_cache_dir:
        return features, collator
    from .feature_cache import CachedFeatureCollator, build_feature_cache

    cache = build_feature_cache(
        model, features, data_args.feature_cache_dir, batch_size=training_args.per_device_eval_batch_size
    )
    return cache.attach(features), CachedFeatureCollator(collator, cache, model=model)
