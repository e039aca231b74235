"""Training data, the same on every rank for any world size: where text comes from (corpus.py),
tokenizers (tokenizer.py), packed language-model rows (packing.py), classification examples
(classification.py), and which rows form each global batch and each rank's share (batching.py).

May import torch and the tokenizers of transformers; nothing else of worker/ (import-linter).
"""
