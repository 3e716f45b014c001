"""Atomic file writes shared by the package's builders and tables (Hub uploads: utils/hub.py).

(hf_kadapter/kadapter/modeling_kadapter.py keeps its own small copies: it is shipped as remote code and may import
nothing from this package.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save

from .utils.hub import push_folder_to_hub  # the Hub helpers live in utils/hub.py (with the model cards)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write through a temporary file in the same folder, then os.replace: a reader (or a build resumed after a
    crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode, encoding=None if "b" in mode else encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a saved folder must be readable like any other
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> None:
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("ensure_ascii", False)
    with atomic_write(path) as stream:
        json.dump(data, stream, **dump_kwargs)


def save_tensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors (never pickle) with the same guarantee as atomic_write."""
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as stream:
        stream.write(payload)


__all__ = ["atomic_write", "push_folder_to_hub", "save_tensors_atomic", "write_json_atomic"]
