"""Chores every part of the package needs, each written once.

`files` (atomic writes), `cpu` (CPU feature flags), `digest` (array and
weight digests), `inference` (batched prediction), `logs` (logging set-up).
Nothing here imports from the rest of the package.
"""
