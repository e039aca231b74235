"""Worker side: membership, models and data, the ZeRO-3 engine, trainer, checkpoints, CLI."""
