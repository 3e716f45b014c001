"""The README's main job (examples/quickstart.py) runs end to end on a tiny local base with its own tokenizer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import quickstart  # noqa: E402


def _tiny_base_with_tokenizer(folder: Path) -> Path:
    words = sorted({w.lower() for text, *_ in quickstart.EXAMPLES for w in text.split()} | {"@", "#"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_marker_positions_point_at_the_markers(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_tiny_base_with_tokenizer(tmp_path / "base"))
    encoded = quickstart.encode(tokenizer, ["Albert", "Einstein", "was", "born", "in", "Ulm", "."], (0, 1), (5, 5))
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"].tolist())
    assert tokens == ["[CLS]", "@", "albert", "einstein", "@", "was", "born", "in", "#", "ulm", "#", ".", "[SEP]"]
    assert tokens[encoded["subject_positions"]] == "@" and encoded["subject_positions"] == 1
    assert tokens[encoded["object_positions"]] == "#" and encoded["object_positions"] == 8


def test_quickstart_runs_end_to_end(tmp_path):
    base = _tiny_base_with_tokenizer(tmp_path / "base")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--base",
            str(base),
            "--steps",
            "6",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "outputs identical = True" in result.stdout
    assert (tmp_path / "out" / "factual-adapter" / "model.safetensors").exists()


def test_readme_cpu_install_gets_the_cpu_build_of_the_pinned_torch():
    """Pinning torch alone pulls a CUDA build from PyPI on Linux: the CPU install must name PyTorch's CPU index,
    install torch before the package, and install the version constraints-cpu.txt pins."""
    readme = (ROOT / "README.md").read_text()
    pinned = next(line for line in (ROOT / "constraints-cpu.txt").read_text().splitlines() if line.startswith("torch"))
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    install = next(block for block in blocks if "-c constraints-cpu.txt -e " in block)
    torch_line = next(line for line in install.splitlines() if line.startswith("pip install torch"))
    assert pinned in torch_line.split() and "https://download.pytorch.org/whl/cpu" in torch_line
    assert install.index(torch_line) < install.index("-c constraints-cpu.txt -e ")
