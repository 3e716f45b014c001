"""Plot bench_retrieval.py's figures: recall@10 against queries/s for every method and search setting, one panel
per corpus size and data kind, with the exact search's rate as a reference line.

    python benchmarks/plot_retrieval.py retrieval_1m.json retrieval_10m_*.json --output docs/retrieval/search.png

Needs matplotlib (`pip install -e ".[bench]"`). Reads only the JSON files: nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKERS = {"IVF-flat": "o", "IVF-PQ+rescore": "s", "HNSW": "^"}


def panels(paths: list[str]) -> list[dict]:
    """Every (size, data) result of the files, smallest corpus first, clustered before random."""
    results = [result for path in paths for result in json.loads(Path(path).read_text())["results"]]
    return sorted(results, key=lambda r: (r["num_docs"], r["data"] != "clustered"))


def label(search: dict) -> str:
    keys = {"nprobe": "p", "rescore_factor": "r", "ef_search": "ef"}
    return ",".join(f"{short}{search[key]}" for key, short in keys.items() if key in search)


def plot(paths: list[str], output: str, k: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    results = panels(paths)
    columns = min(2, len(results))
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    for axis, result in zip(axes.flat, results, strict=False):
        exact = next(m for m in result["methods"] if m["method"] == "exact")["searches"][0]["queries_per_second"]
        axis.axvline(exact, color="grey", linestyle="--", linewidth=1)
        axis.text(exact, 0.5, " exact search", color="grey", fontsize=8, rotation=90, va="center")
        for method in result["methods"]:
            if method["method"] == "exact":
                continue
            xs = [s["queries_per_second"] for s in method["searches"]]
            ys = [s[f"recall@{k}"] for s in method["searches"]]
            name = f"{method['method']} ({method['bytes_per_vector']:.0f} B/vector)"
            axis.plot(xs, ys, marker=MARKERS.get(method["method"], "x"), linestyle="", label=name)
            for x, y, search in zip(xs, ys, method["searches"], strict=True):
                axis.annotate(label(search), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # (minor labels of a short log axis overlap)
        axis.set_ylim(0, 1.05)
        axis.axhline(0.95, color="lightgrey", linewidth=0.8)
        axis.set_xlabel("queries / s (2 CPU threads, log scale)")
        axis.set_ylabel(f"recall@{k} against exact")
        axis.set_title(f"{result['num_docs']:,} vectors, {result['data']}")
        axis.legend(fontsize=7, loc="lower left")
    for axis in list(axes.flat)[len(results) :]:
        axis.set_visible(False)
    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="bench_retrieval.py --json files")
    parser.add_argument("--output", default="retrieval_search.png")
    args = parser.parse_args()
    plot(args.json, args.output)


if __name__ == "__main__":
    main()
