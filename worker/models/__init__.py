"""Models: configs (config.py), the one dtype table (dtypes.py), tiny presets built from
``transformers`` configs (presets.py), building or loading one offline (loading.py), finding
its transformer blocks (blocks.py), and peft LoRA (lora.py).

May import torch, transformers and peft; nothing else of worker/ (checked by import-linter).
"""
