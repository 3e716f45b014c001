"""The shared floor of the package: Hub IO, model cards and model plumbing used by every method's folder.

Nothing here imports a method's folder at import time.
"""
