"""``python -m worker.cli``: the ``zerop2p`` command (how local launchers start workers)."""

from worker.cli.app import app

app()
