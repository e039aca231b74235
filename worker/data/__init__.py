"""Training data, the same on every rank for any world size: where text comes from (corpus.py,
hf_sources.py), tokenizers (tokenizer.py), the packed token stream (stream.py) and its on-disk
store that each rank reads its rows from (store.py), packed language-model rows (packing.py),
classification examples (classification.py), and which rows form each global batch and each
rank's share (batching.py).

May import torch, numpy, Hugging Face ``datasets`` (lazily) and the tokenizers of transformers;
nothing else of worker/ (import-linter).
"""
