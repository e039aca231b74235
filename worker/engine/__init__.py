"""The ZeRO-3 engine: flat layouts of sharding units (sharding.py), one unit's owned slices and
gather buffer (unit.py), the engine that drives them through forward and backward (zero3.py),
and the progress events it publishes to observers (progress.py).

May import torch and ``communication.collectives`` (the Collectives seam) only: never grpc,
torch.distributed, HTTP libraries, or any other part of worker/ (checked by import-linter).
"""
