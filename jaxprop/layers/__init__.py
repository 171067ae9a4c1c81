"""Layers: one concept per file, each with its derivation in the docstring."""
