"""The remote-code files (modeling_kadapter.py, modeling_retriever.py) cannot import hf_kadapter: their private copies
of the shared folder-commit and fingerprint helpers must stay identical to hf_kadapter/utils (this test fails when
they drift)."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

import hf_kadapter.kadapter.modeling_kadapter as modeling_kadapter
import hf_kadapter.retrieval.modeling_retriever as modeling_retriever
import hf_kadapter.utils.fingerprint as fingerprint
import hf_kadapter.utils.io as shared_io

COPIED = {
    shared_io: [
        "DamagedFileError", "_fault_point", "_fsync_dir", "atomic_write", "_open_temporary", "read_json", "safetensors_problem",
        "check_safetensors", "_flock", "_is_mechanism_entry", "_records", "_stagings", "_relative_files", "_matches",
        "_apply_record", "_temporaries", "_clean_stagings", "recover_folder", "reading_folder", "FolderCommit",
        "reading_local",
    ],
    fingerprint: [
        "FingerprintDtypeError", "_native_and_views", "_as_bytes", "_segment_digests", "_digests",
        "fingerprint_tensors", "_is_lora_key", "base_tensors", "base_fingerprint", "parse_fingerprint",
        "comparison_view", "compare_fingerprints", "tensors_match_fingerprint",
    ],
}  # fmt: skip
CONSTANTS = {
    shared_io: ["STAGING_PREFIX", "RECORD_PREFIX", "BUILD_LOCK_NAME", "MECHANISM_PATTERNS", "WEIGHTS_PATTERNS"],
    fingerprint: ["FINGERPRINT_VERSION", "_VIEW_DTYPES", "_SEGMENT", "_BLOCK"],
}
TARGETS = [
    (modeling_kadapter, shared_io),
    (modeling_kadapter, fingerprint),
    (modeling_retriever, shared_io),
]


def _copy_source(target, name: str) -> str | None:
    """The source of a top-level definition as written in the remote-code file (inside the package the exception
    classes are replaced by the package's own, so the module attribute would not show the copy)."""
    lines = Path(target.__file__).read_text(encoding="utf-8").splitlines(keepends=True)
    for node in ast.parse("".join(lines)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            end = node.end_lineno
            while end < len(lines) and lines[end].strip().startswith("#") and lines[end].startswith(" "):
                end += 1  # a comment closing the body belongs to it, as inspect.getsource sees it
            return "".join(lines[start:end])
    return None


@pytest.mark.parametrize(("target", "module"), TARGETS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_copies_are_identical(target, module):
    for name in COPIED[module]:
        copy = _copy_source(target, name)
        assert copy is not None, f"{target.__name__} lacks its copy of {module.__name__}.{name}"
        assert copy == inspect.getsource(getattr(module, name)), (
            f"{target.__name__}.{name} differs from {module.__name__}.{name}: copy the shared version over"
        )
    for name in CONSTANTS[module]:
        assert getattr(target, name) == getattr(module, name), name


def test_inside_the_package_one_exception_class_of_each():
    for target in (modeling_kadapter, modeling_retriever):
        assert target.DamagedFileError is shared_io.DamagedFileError
    assert modeling_kadapter.FingerprintDtypeError is fingerprint.FingerprintDtypeError


def test_every_helper_the_copies_use_is_copied():
    """A copied function that calls a helper of its module must find that helper copied too."""
    for module, names in COPIED.items():
        defined = {
            name
            for name, value in vars(module).items()
            if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__
        }
        for name in names:
            tree = ast.parse(inspect.getsource(getattr(module, name)))
            used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
            missing = (used & defined) - set(names) - {name}
            assert not missing, f"{module.__name__}.{name} uses {sorted(missing)}, which the copies lack"


@pytest.mark.parametrize("target", [modeling_kadapter, modeling_retriever], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_the_remote_code_imports_nothing_from_the_package(target):
    tree = ast.parse(Path(target.__file__).read_text(encoding="utf-8"))
    # peft only inside add_base_lora (optional); fcntl and xxhash are guarded imports.
    allowed = {"torch", "transformers", "huggingface_hub", "safetensors", "fcntl", "xxhash", "peft"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in ("configuration_kadapter", "configuration_retriever"), ast.dump(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root in allowed or root in sys.stdlib_module_names, name
