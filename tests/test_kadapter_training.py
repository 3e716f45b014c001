"""Continual knowledge (adding/loading adapters) and training with the standard Trainer."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import VOCAB, batch, make_model, tiny_adapter
from safetensors import safe_open
from transformers import AutoModel, BertConfig, BertModel, Trainer, TrainingArguments

import hf_kadapter as hk

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class FactualToyData(torch.utils.data.Dataset):
    """A learnable relation task: the label is a function of the token at the subject marker."""

    def __init__(self, size: int = 32, length: int = 10, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (size, length), generator=generator)
        self.subject = torch.randint(1, length // 2, (size,), generator=generator)
        self.object = torch.randint(length // 2, length, (size,), generator=generator)
        self.labels = self.ids[torch.arange(size), self.subject] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "subject_positions": self.subject[i],
            "object_positions": self.object[i],
            "labels": self.labels[i],
        }


def _args(out, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _factual(base_dir, adapters=None, **kwargs):
    adapters = adapters or {"factual": tiny_adapter(**NO_DROPOUT)}
    return make_model(
        base_dir, hk.KAdapterForFactualPretraining, adapters=adapters, num_labels=3, classifier_dropout=0.0, **kwargs
    )


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_trains_only_the_adapter_and_loss_falls(base_dir, tmp_path):
    model = _factual(base_dir)
    base_before = {k: v.clone() for k, v in model.kadapter.pretrained_model.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.kadapter.adapters.state_dict().items()}
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=30), train_dataset=FactualToyData())
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for key, value in model.kadapter.pretrained_model.state_dict().items():
        assert torch.equal(value, base_before[key]), key
    assert any(not torch.equal(v, adapter_before[k]) for k, v in model.kadapter.adapters.state_dict().items())


def test_gradient_accumulation_gives_the_same_loss_scale(base_dir, tmp_path):
    runs = {}
    for name, (bs, accumulation) in {"plain": (4, 1), "accumulated": (2, 2)}.items():
        model = _factual(base_dir)
        args = _args(
            tmp_path / name,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
            learning_rate=1e-3,
        )
        trainer = Trainer(model=model, args=args, train_dataset=FactualToyData(size=12))
        trainer.train()
        runs[name] = (_losses(trainer), model.kadapter.adapters.state_dict())
    (loss_a, weights_a), (loss_b, weights_b) = runs["plain"], runs["accumulated"]
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for key, value in weights_a.items():
        assert torch.allclose(value, weights_b[key], atol=1e-6), key


def test_trainer_checkpoints_hold_trainable_weights_and_resume(base_dir, tmp_path, caplog):
    data = FactualToyData(size=16)
    straight = _factual(base_dir)
    Trainer(model=straight, args=_args(tmp_path / "straight"), train_dataset=data).train()

    interrupted = _factual(base_dir)
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    Trainer(model=interrupted, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not any(".pretrained_model." in f".{k}" for k in keys)
    assert any(k.startswith("kadapter.adapters.factual.") for k in keys)
    assert os.path.getsize(checkpoint / "model.safetensors") < os.path.getsize(
        os.path.join(base_dir, "model.safetensors")
    )

    resumed = _factual(base_dir, seed=123)  # different init: everything must come from the checkpoint
    Trainer(model=resumed, args=_args(tmp_path / "run", save_strategy="steps", save_steps=2), train_dataset=data).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    assert "missing keys" not in caplog.text


# ----- continual knowledge -----------------------------------------------------------------------------------
def test_adding_and_training_a_new_adapter_leaves_old_outputs_bit_identical(base_dir, tmp_path):
    model = _factual(base_dir)
    Trainer(model=model, args=_args(tmp_path / "first"), train_dataset=FactualToyData()).train()
    model.eval()
    inputs = batch()
    before = model.kadapter(**inputs).adapter_hidden_states[0].clone()
    old_weights = {k: v.clone() for k, v in model.kadapter.adapters["factual"].state_dict().items()}

    model.add_adapter("lexical", tiny_adapter(tap_layers=[1, 3], **NO_DROPOUT))
    model.config.pretraining_adapter = "lexical"
    model._apply_trainability()
    assert not any(p.requires_grad for p in model.kadapter.adapters["factual"].parameters())
    out = model.kadapter(**inputs)
    assert torch.equal(model.kadapter.adapter_output(out, "factual"), before)

    Trainer(model=model, args=_args(tmp_path / "second"), train_dataset=FactualToyData(seed=1)).train()
    model.eval()
    out = model.kadapter(**inputs)
    assert torch.equal(model.kadapter.adapter_output(out, "factual"), before)
    for key, value in model.kadapter.adapters["factual"].state_dict().items():
        assert torch.equal(value, old_weights[key])


def test_load_adapter_from_a_separately_trained_folder(base_dir, tmp_path):
    factual = make_model(base_dir, adapters={"factual": tiny_adapter()})
    linguistic = make_model(base_dir, adapters={"linguistic": tiny_adapter(tap_layers=[1, 4])}, seed=1)
    factual.save_pretrained(tmp_path / "factual")
    linguistic.save_pretrained(tmp_path / "linguistic")

    combined = hk.KAdapterModel.from_base(base_dir).eval()
    combined.load_adapter(tmp_path / "factual", freeze=True)
    combined.load_adapter(tmp_path / "linguistic", name="linguistic", adapter_name="syntax")
    assert combined.active_adapters() == ["factual", "syntax"]
    assert combined.config.frozen_adapters == ["factual"]
    assert not any(p.requires_grad for p in combined.adapters["factual"].parameters())
    assert all(p.requires_grad for p in combined.adapters["syntax"].parameters())
    out = combined(**batch())
    assert torch.equal(combined.adapter_output(out, "factual"), factual(**batch()).adapter_hidden_states[0])
    assert torch.equal(combined.adapter_output(out, "syntax"), linguistic(**batch()).adapter_hidden_states[0])

    # Freezing and the adapter set survive a save/load round trip.
    combined.save_pretrained(tmp_path / "combined")
    reloaded = AutoModel.from_pretrained(tmp_path / "combined")
    assert reloaded.config.frozen_adapters == ["factual"]
    assert not any(p.requires_grad for p in reloaded.adapters["factual"].parameters())
    assert torch.equal(reloaded(**batch()).last_hidden_state, out.last_hidden_state)

    with pytest.raises(ValueError, match="already exists"):
        combined.load_adapter(tmp_path / "factual")


def test_load_adapter_refuses_another_base(base_dirs, tmp_path):
    make_model(base_dirs["bert"]).save_pretrained(tmp_path / "bert-adapter")
    # Same shapes, other weights.
    torch.manual_seed(7)
    other = BertModel(BertConfig.from_pretrained(base_dirs["bert"]), add_pooling_layer=False)
    model = hk.KAdapterModel.from_base(other)
    with pytest.raises(hk.KAdapterBaseMismatchError, match="other base weights"):
        model.load_adapter(tmp_path / "bert-adapter")
    assert "factual" not in model.config.adapters
    # Other hidden size.
    wide = hk.KAdapterModel.from_base(BertModel(BertConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4)))
    with pytest.raises(hk.KAdapterBaseMismatchError, match="hidden size 32"):
        wide.load_adapter(tmp_path / "bert-adapter")
    # The explicit override works for identical shapes.
    model.load_adapter(tmp_path / "bert-adapter", check_base=False)
    assert "factual" in model.config.adapters


def test_freeze_and_unfreeze(base_dir):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter()})
    model.freeze_adapter("factual")
    assert not any(p.requires_grad for p in model.adapters["factual"].parameters())
    assert all(p.requires_grad for p in model.adapters["linguistic"].parameters())
    model.unfreeze_base()
    assert all(p.requires_grad for p in model.pretrained_model.parameters())
    model.train()
    assert model.pretrained_model.training
    out = model(**batch())
    assert out.base_last_hidden_state.grad_fn is not None
    model.unfreeze_adapter("factual")
    model.freeze_base()
    assert model.base_is_frozen() and all(p.requires_grad for p in model.adapters.parameters())
    with pytest.raises(KeyError, match="No adapter named"):
        model.freeze_adapter("missing")
    model.delete_adapter("linguistic")
    assert list(model.adapters) == ["factual"] and "linguistic" not in model.config.adapters
