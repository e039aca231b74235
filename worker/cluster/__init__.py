"""Local clusters of processes: the launcher that starts a coordinator and N workers, restarts
the crashed and stops the rest (launcher.py), and free ports (ports.py).

Works on processes and command lines only: imports nothing of worker/ (import-linter).
"""
