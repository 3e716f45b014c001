"""The documentation's examples run: every ```python block of a docs page, in order, in one fresh interpreter.

Blocks fenced as ```python no-run (they need the Hub) are skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*?)\s*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced block whose info string is exactly `python`."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, runnable, start = opening["fence"], opening["info"] == "python", i + 1
        i += 1
        body: list[str] = []
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"]:
                break
            body.append(lines[i])
            i += 1
        i += 1
        if runnable:
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
    return blocks


def page_script(page: Path) -> str:
    parts = [
        f"# ---- {page.name}, block at line {line} ----\n{code}\n" for line, code in python_blocks(page.read_text())
    ]
    return "\n".join(parts)


def test_block_extraction_skips_no_run_blocks():
    text = "x\n```python\na = 1\n```\n```python no-run\nb = 2\n```\n```\nc = 3\n```\n  ```python\n  d = 4\n  ```\n"
    assert python_blocks(text) == [(3, "a = 1"), (12, "d = 4")]


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_docs_page_examples_run(page, tmp_path):
    script = page_script(page)
    if not script:
        pytest.skip(f"{page.name} has no runnable python blocks")
    (tmp_path / "script.py").write_text(script)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "hf-modules"),  # trust_remote_code examples write dynamic modules here
        TMPDIR=str(tmp_path),  # the pages work in tempfile.mkdtemp() folders: keep them under pytest's tmp_path
        OMP_NUM_THREADS="1",  # tiny example models: thread start-up costs more than it saves (2x faster on 2 cores)
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, str(tmp_path / "script.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{page.name} examples failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
