"""The ``zerop2p`` command line: the typer app (app.py) and the training options shared by
``zerop2p worker`` and ``zerop2p train``, from flags or TOML (the table in flags.py, the
validated TrainConfig from options.py).

The top of worker/: may import every other part of it (its commands import the heavy ones
when they run, so ``--help`` stays fast) and the coordinator's entry for ``zerop2p
coordinator``.
"""
