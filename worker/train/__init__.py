"""Training: the run's configuration (config.py), optimizer and schedule (optim.py), the
trainer's own saved progress (state.py), and the loop over a sharded model (trainer.py).

May import the engine, data, models and state/ (which it hands its states to); never
membership, the CLI or the worker's wiring (checked by import-linter).
"""
