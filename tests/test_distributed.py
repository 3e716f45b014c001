"""`torchrun --nproc_per_node 2` on CPU (gloo) trains like one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import ROOT, _argv, recipe_base  # noqa: F401 (recipe_base is a fixture)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(output: Path) -> list[float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_process_run_matches_single_process(recipe_base, tmp_path):  # noqa: F811
    script = str(ROOT / "examples" / "pretrain_factual.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single, double = tmp_path / "single", tmp_path / "ddp"
    # The fixture has 6 records: a global batch of 6 (1 x 6, or 2 processes x 3) sees all of them every step.
    one = subprocess.run(
        [sys.executable, script, *_argv(recipe_base, single, "trex_train.json", "--per_device_train_batch_size", "6",
                                         steps=3)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), script,
         *_argv(recipe_base, double, "trex_train.json", "--per_device_train_batch_size", "3", "--ddp_backend", "gloo",
                steps=3)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(_losses(single)) == 3
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-4)
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
