"""The accelerate configs of docs/accelerate/ are what `accelerate launch` accepts, and `accelerate launch` runs a
recipe exactly like plain python (CPU: one process, and ddp.yaml with two gloo processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file
from test_distributed import _free_port, _losses
from test_recipes import ROOT, _argv, _run, recipe_base  # noqa: F401 (recipe_base is a fixture)
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, StateDictType
from transformers import RobertaConfig, RobertaModel

import hf_kadapter as hk

CONFIGS = ROOT / "docs" / "accelerate"
KINDS = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}


def _launch_args(name: str):
    """What `accelerate launch --config_file docs/accelerate/<name>` makes of the file (arguments and config)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, config, _ = _validate_launch_command(args)
    return args, config


def test_the_documented_configs_are_the_tested_ones():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(KINDS)
    page = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert all(f"docs/accelerate/{name}" in page for name in KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_config_parses_as_an_accelerate_config(name):
    config = load_config_from_file(str(CONFIGS / name))  # raises on keys accelerate does not know
    assert isinstance(config, ClusterConfig) and config.distributed_type == KINDS[name]
    assert config.num_machines == 1 and config.num_processes > 1 and config.mixed_precision == "no"
    # Nested keys become `accelerate launch` options; one it does not have would be ignored without a word.
    options = vars(launch_command_parser().parse_args(["train.py"]))
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(config, section):
            assert (key if key.startswith(prefix) else prefix + key) in options, f"{name}: unknown {section}.{key}"
    args, _ = _launch_args(name)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        KINDS[name] == DistributedType.MULTI_GPU,
        KINDS[name] == DistributedType.FSDP,
        KINDS[name] == DistributedType.DEEPSPEED,
    )


def _tiny_roberta_factual(seed: int = 0) -> hk.KAdapterForFactualPretraining:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
    )
    adapter = hk.KnowledgeAdapterConfig(
        tap_layers=[0, 2, 3], hidden_size=16, num_attention_heads=2, intermediate_size=32
    )
    base = RobertaModel(config, add_pooling_layer=False)
    return hk.KAdapterForFactualPretraining.from_base(base, adapters={"factual": adapter}, num_labels=3).train()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_config_wraps_a_frozen_base_pretraining_model(tmp_path):
    args, _ = _launch_args("fsdp.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()  # the plugin Trainer's Accelerator builds from the launcher's env
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.use_orig_params and plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert not plugin.cpu_ram_efficient_loading
    plugin.set_auto_wrap_policy(_tiny_roberta_factual())  # raises if a class to wrap is not in the model

    inputs = {
        "input_ids": torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "subject_positions": torch.tensor([1, 1]),
        "object_positions": torch.tensor([3, 4]),
        "labels": torch.tensor([0, 2]),
    }
    expected = _tiny_roberta_factual()(**inputs).loss
    # One process is enough to see how FSDP1 flattens the parameters of a model whose base is frozen (it shards
    # nothing then, NO_SHARD, but builds the same flat parameters and refuses the same mixes).
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="uniform `requires_grad`"):
            FullyShardedDataParallel(
                _tiny_roberta_factual(), auto_wrap_policy=plugin.auto_wrap_policy, device_id=torch.device("cpu")
            )
        model = _tiny_roberta_factual()
        frozen = {n: p.detach().clone() for n, p in model.kadapter.pretrained_model.named_parameters()}
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=plugin.auto_wrap_policy, use_orig_params=True, device_id=torch.device("cpu")
        )
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        loss = wrapped(**inputs).loss
        loss.backward()
        optimizer.step()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        after = wrapped(**inputs).loss
        assert after.item() < loss.item()
        with FullyShardedDataParallel.summon_full_params(wrapped):  # the frozen base did not move
            base = {
                name.replace("_fsdp_wrapped_module.", ""): parameter
                for name, parameter in model.kadapter.pretrained_model.named_parameters()
            }
            assert base.keys() == frozen.keys()
            for name, parameter in base.items():
                assert torch.equal(parameter, frozen[name]), name
    finally:
        torch.distributed.destroy_process_group()


def test_deepspeed_config_leaves_accumulation_and_clipping_to_the_trainer():
    args, config = _launch_args("deepspeed_zero2.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)  # as `accelerate launch` does
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # builds the DeepSpeed config only: deepspeed itself is not needed
    assert plugin.zero_stage == 2 and not plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["offload_param"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled from TrainingArguments
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"


def test_accelerate_launch_trains_like_plain_python(recipe_base, tmp_path):  # noqa: F811
    script = str(ROOT / "examples" / "pretrain_factual.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    outputs = {name: tmp_path / name for name in ("plain", "accelerate", "accelerate-ddp")}

    def argv(name: str, batch: int, *extra: str) -> list[str]:
        # The fixture has 6 records: a global batch of 6 (1 x 6, or 2 processes x 3) sees all of them every step.
        return _argv(recipe_base, outputs[name], "trex_train.json", "--per_device_train_batch_size", str(batch),
                     *extra, steps=3)  # fmt: skip

    commands = {
        "accelerate": [*accelerate, "--cpu", "--num_processes", "1", script, *argv("accelerate", 6)],
        # docs/accelerate/ddp.yaml itself, on two CPU processes: Trainer's --use_cpu makes it gloo DDP.
        "accelerate-ddp": [
            *accelerate, "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
            "--main_process_port", str(_free_port()), script, *argv("accelerate-ddp", 3, "--ddp_backend", "gloo"),
        ],
    }  # fmt: skip
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in commands}  # noqa: SIM115 (closed below)
    running = {
        name: subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT, env=env)
        for name, command in commands.items()
    }
    try:
        _run("pretrain_factual", argv("plain", 6))  # the reference, in this process while the launches run
        for process in running.values():
            process.wait(timeout=300)
    finally:
        for process in running.values():
            if process.poll() is None:  # the reference run failed: do not leave the launches behind
                process.kill()
                process.wait()
        for handle in logs.values():
            handle.close()
    for name, process in running.items():
        assert process.returncode == 0, f"{name}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"

    reference = _losses(outputs["plain"])
    assert len(reference) == 3
    weights = load_file(outputs["plain"] / "model.safetensors")
    for name in commands:
        assert _losses(outputs[name]) == pytest.approx(reference, rel=1e-4), name
        other = load_file(outputs[name] / "model.safetensors")
        assert other.keys() == weights.keys()
        for key in weights:
            assert torch.allclose(other[key], weights[key], atol=1e-5), (name, key)
