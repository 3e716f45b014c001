"""The shared floor under K-Adapter, PELT and the retriever: folder commits, fingerprints, Hub IO, record reading.

Nothing here imports a method's folder. `hf_kadapter/kadapter/modeling_kadapter.py` (shipped as remote code) keeps
private copies of the io and fingerprint helpers it needs; tests/test_utils_remote_copies.py keeps them identical.
"""
