"""PELT: pluggable entity lookup tables."""
