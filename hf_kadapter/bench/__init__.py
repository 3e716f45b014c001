"""The knowledge benchmark: does each method put knowledge into a model, against the same model without it?

`run_benchmark("quick")` (or `hf-kadapter bench --quick`) runs K-Adapter, PELT and REALM experiments on the packaged
WordNet knowledge suite (`load_wordnet_suite`) with the packaged small models, several seeds per condition, and
reports every gain as a paired difference with a bootstrap confidence interval (see docs/benchmark.md).
"""

from .runner import METHODS, MODES, run_benchmark
from .stats import MetricRuns, paired_bootstrap
from .wordnet import build_wordnet_suite, load_wordnet_suite, read_table, suite_checksum, write_wordnet_suite

__all__ = [
    "METHODS",
    "MODES",
    "MetricRuns",
    "build_wordnet_suite",
    "load_wordnet_suite",
    "paired_bootstrap",
    "read_table",
    "run_benchmark",
    "suite_checksum",
    "write_wordnet_suite",
]
