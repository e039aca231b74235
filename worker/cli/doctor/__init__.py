"""``zerop2p doctor``: is this cluster computing what one process computes, and what usually
breaks it? A few steps of the user's own model and data on N local workers and in one process
(parity.py compares them), an audit of the sharding units (units.py), and checks of ports,
token, clock and peer links (checks.py), printed as tables and a verdict (report.py);
command.py holds the command, cluster.py the sharded run.

Part of the CLI layer: may import every other part of worker/ (worker/main.py's builders, the
launcher, the engine's unit discovery, the single-process runner) and communication/'s client
and transport for the checks; the command imports the heavy ones when it runs.
"""
