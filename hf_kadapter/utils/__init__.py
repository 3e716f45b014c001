"""The shared floor of the package: folder commits and named file errors (io), the weights fingerprint, Hub IO and
model cards (hub), model plumbing (modeling) and record reading (records), used by every method's folder.

Nothing here imports a method's folder at import time. `hf_kadapter/kadapter/modeling_kadapter.py` (shipped as
remote code) keeps private copies of the io and fingerprint helpers it needs; tests/test_utils_remote_copies.py
keeps them identical.
"""
