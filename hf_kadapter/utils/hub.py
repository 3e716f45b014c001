"""Hub uploads shared by every artefact (models, entity tables, retrievers)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from huggingface_hub import HfApi

from .io import MECHANISM_PATTERNS


def push_folder_to_hub(
    save: Callable[[str], None],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create the repo if needed, let `save` write the folder into a temporary directory, upload it."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=[f"**/{pattern}" for pattern in MECHANISM_PATTERNS] + list(MECHANISM_PATTERNS),
        )


__all__ = ["push_folder_to_hub"]
