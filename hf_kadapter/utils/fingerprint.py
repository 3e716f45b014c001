"""One fingerprint of a model's weights: every byte of every tensor counts, and dtype copies of the same weights agree.

Used for K-Adapter bases (adapters and configs record the base they were trained on), the feature cache key, PELT
entity tables (encoder plus the LM head's transform, which makes the vectors) and document indexes (their embedder).

Why "views". No elementwise canonical form can make an fp32 weight, its fp16 copy and its bf16 copy all hash
equal: rounding to fp16 and rounding to bf16 both merge neighbouring fp32 values, and chaining the two relations
links every real number to every other. So a fingerprint holds one digest per view of the weights:

* a float32 model (float64 counts as float32) has a float32 view (its bytes), a float16 view (each value rounded to
  nearest-even fp16, as `tensor.half()` does) and a bfloat16 view (likewise);
* a float16 model has its float16 view only (its float32 upcast holds no more information), a bfloat16 model its
  bfloat16 view; integer tensors are hashed as they are, in every view.

Two fingerprints match when they have the same digest for the view of the LOWER precision side's dtype: fp32 vs
fp32 compares the float32 views, fp32 vs fp16 the float16 views, and so on. A float16 model cannot be checked
against a bfloat16 one (neither view can be computed from the other side): `FingerprintDtypeError` names the fix.

Stored form, a short string: `fp2:<native dtype>:<view>=<32 hex>,...`. Digests are xxh3-128 (a fast
non-cryptographic hash: this is an identity check, not a security boundary) over fixed-size segments, then over
(name, shape, segment digests) in name order; views are converted block by block through reused buffers, so the
cost is about one pass over the weights at memory speed (benchmarks/bench_fingerprint.py). Fingerprints written by hf_kadapter < 0.2
("sha256:..." over the first and last 512 values of each tensor) cannot be verified: `compare_fingerprints` returns
None for them and the callers warn and skip the check (saving again records a new fingerprint).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

try:  # a dependency of hf_kadapter (through datasets); remote code without it records no fingerprint
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

FINGERPRINT_VERSION = "fp2"
_VIEW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SEGMENT = 1 << 22  # elements hashed as one independent task
_BLOCK = 1 << 15  # elements converted to a view at once: in cache, and under torch's parallel grain size


class FingerprintDtypeError(ValueError):
    """Two fingerprints come from float16 and bfloat16 copies: nothing can tell whether the weights are the same."""


def _native_and_views(dtypes: set[torch.dtype]) -> tuple[str, tuple[str, ...]]:
    """(native dtype name, views the weights can be hashed in) for the floating dtypes of a model."""
    names = {str(d).removeprefix("torch.") for d in dtypes} - {"float64"}
    if names <= {"float32"}:
        return "float32", tuple(_VIEW_DTYPES)
    halves = names - {"float32"}
    if len(halves) == 1 and next(iter(halves)) in _VIEW_DTYPES:
        half = next(iter(halves))
        return half, (half,)
    return "mixed", ("raw",)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _segment_digests(flat: torch.Tensor, views: tuple[str, ...]) -> dict[str, bytes]:
    """Digest of one segment of a flat CPU tensor in each view. Views in the tensor's own dtype hash its bytes at once;
    the others are converted block by block through reused buffers (blocks stay under torch's parallel grain size:
    OpenMP threads spun up per small copy made this ten times slower on a busy machine)."""
    hashers = {view: xxhash.xxh3_128() for view in views}
    floating = flat.is_floating_point()
    if floating and flat.dtype == torch.float64:
        flat = flat.to(torch.float32)  # float64 counts as float32: its fp16 view is RNE16(RNE32(x))
    converted = [v for v in views if floating and v != "raw" and flat.dtype != _VIEW_DTYPES[v]]
    for view in views:
        if view not in converted:
            hashers[view].update(_as_bytes(flat))
    buffers = {view: torch.empty(min(_BLOCK, flat.numel()), dtype=_VIEW_DTYPES[view]) for view in converted}
    for start in range(0, flat.numel() if converted else 0, _BLOCK):
        part = flat[start : start + _BLOCK]
        for view in converted:
            data = buffers[view][: part.numel()]
            data.copy_(part)
            hashers[view].update(_as_bytes(data))
    return {view: hasher.digest() for view, hasher in hashers.items()}


def _digests(named: list[tuple[str, torch.Tensor]], views: tuple[str, ...]) -> dict[str, str]:
    """Per view: xxh3-128 over (name, shape, kind, segment digests) of every tensor, in name order."""
    # One thread: xxhash holds the GIL (threads would not hash faster), torch's own threads convert, and a thread
    # pool would break in forked processes (torch's OpenMP pool is invalid in a fork's new threads).
    segments = []
    for _, tensor in named:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        for start in range(0, max(flat.numel(), 1), _SEGMENT):
            segments.append(_segment_digests(flat[start : start + _SEGMENT], views))
    totals = {view: xxhash.xxh3_128() for view in views}
    position = 0
    for name, tensor in named:
        count = max(1, -(-tensor.numel() // _SEGMENT))
        kind = "float" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
        for view, total in totals.items():
            total.update(f"{name}|{tuple(tensor.shape)}|{kind}|".encode())
            for digest in segments[position : position + count]:
                total.update(digest[view])
        position += count
    return {view: total.hexdigest() for view, total in totals.items()}


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]], views: Sequence[str] | None = None) -> str | None:
    """The fingerprint of named tensors (all the views their dtype allows, or only `views`); None when a tensor is
    on the meta device (weights not loaded) or xxhash is missing (remote code outside hf_kadapter)."""
    named = sorted(named, key=lambda item: item[0])
    if xxhash is None or any(tensor.device.type == "meta" for _, tensor in named):
        return None
    native, available = _native_and_views({t.dtype for _, t in named if t.is_floating_point()})
    wanted = available if views is None else tuple(v for v in available if v in views)
    digests = _digests(named, wanted)
    return f"{FINGERPRINT_VERSION}:{native}:" + ",".join(f"{view}={digests[view]}" for view in wanted)


def native_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The fingerprint in the tensors' own dtype only (one hashing pass): an exact identity, dtype included, for keys
    that must change with the dtype anyway (a feature cache, a resumed index build)."""
    named = list(named)
    _, available = _native_and_views({t.dtype for _, t in named if t.is_floating_point()})
    return fingerprint_tensors(named, views=(available[0],))


def _is_lora_key(key: str) -> bool:
    return "lora_" in key


def base_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A base encoder's named weights as fingerprinted: every tensor of its state_dict but the pooler (K-Adapter
    never uses it) and LoRA add-ons, with peft's `.base_layer.` folded away (LoRA does not change the base)."""
    return [
        (name.replace(".base_layer.", "."), tensor)
        for name, tensor in model.state_dict().items()
        if not name.startswith("pooler.") and not _is_lora_key(name)
    ]


def base_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of a base encoder (see base_tensors): what K-Adapter adapters and feature caches record."""
    return fingerprint_tensors(base_tensors(model))


def parse_fingerprint(value: str | None) -> tuple[str, dict[str, str]] | None:
    """(native dtype, {view: digest}) of a stored fingerprint; None for anything else (an older format)."""
    if not isinstance(value, str) or not value.startswith(FINGERPRINT_VERSION + ":"):
        return None
    try:
        _, native, rest = value.split(":", 2)
        views = dict(item.split("=", 1) for item in rest.split(","))
    except ValueError:
        return None
    return native, views


def comparison_view(native_a: str, native_b: str) -> str:
    """The view two fingerprints are compared in: the lower precision side's dtype."""
    if native_a == native_b:
        return "raw" if native_a == "mixed" else native_a
    if native_a == "float32" and native_b != "mixed":
        return native_b
    if native_b == "float32" and native_a != "mixed":
        return native_a
    raise FingerprintDtypeError(
        f"Cannot check weights recorded in {native_a} against weights in {native_b}: float16 and bfloat16 copies of "
        "the same weights round differently, so neither can be verified from the other. Load the model in float32 "
        "(dtype=torch.float32) or in the dtype it was recorded with, or skip the check (check_base=False for "
        "K-Adapter, check=False for PELT) if you know the weights are the same."
    )


def compare_fingerprints(a: str | None, b: str | None) -> bool | None:
    """True when two stored fingerprints describe the same weights, False when not, None when one of them cannot
    be verified (missing, or written by an older hf_kadapter). Raises FingerprintDtypeError for fp16 vs bf16."""
    parsed_a, parsed_b = parse_fingerprint(a), parse_fingerprint(b)
    if parsed_a is None or parsed_b is None:
        return None
    view = comparison_view(parsed_a[0], parsed_b[0])
    if view not in parsed_a[1] or view not in parsed_b[1]:
        return None
    return parsed_a[1][view] == parsed_b[1][view]


def tensors_match_fingerprint(named: Iterable[tuple[str, torch.Tensor]], stored: str | None) -> bool | None:
    """compare_fingerprints(fingerprint of `named`, stored), hashing only the one view the comparison needs."""
    parsed = parse_fingerprint(stored)
    if parsed is None:
        return None
    named = list(named)
    native, _ = _native_and_views({t.dtype for _, t in named if t.is_floating_point()})
    view = comparison_view(native, parsed[0])
    if view not in parsed[1]:
        return None
    computed = fingerprint_tensors(named, views=(view,))
    return None if computed is None else compare_fingerprints(computed, stored)


__all__ = [
    "FINGERPRINT_VERSION",
    "FingerprintDtypeError",
    "base_fingerprint",
    "base_tensors",
    "compare_fingerprints",
    "comparison_view",
    "fingerprint_tensors",
    "native_fingerprint",
    "parse_fingerprint",
    "tensors_match_fingerprint",
]
