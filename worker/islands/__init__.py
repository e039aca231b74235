"""Islands: ZeRO-3 inside a site, DiLoCo across sites, federated LoRA merges.

May import torch, communication and the engine (below train, above state)."""
