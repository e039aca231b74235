"""Saved state: atomic writes (files.py), which checkpoints exist (catalog.py), ranged reads of
rank files (rank_files.py), the shards that save themselves (shards.py), checkpoints
(checkpoint.py), buddy replicas (buddy.py) and their rescue (rescue.py), and export to a
Hugging Face directory (export.py).

Takes objects that save themselves, never the trainer. May import the engine, models (to
rebuild a skeleton for export) and ``communication.collectives``; never train/, membership,
the CLI or the wiring (checked by import-linter).
"""
