"""Membership: the async HTTP client of the coordinator (client.py), the values it hands back
(views.py: generations, outer rounds), the heartbeat task (heartbeat.py), and the synchronous
facade the training thread uses (facade.py).

May import aiohttp and the coordinator's schemas (``coordinator.models``); nothing else of
worker/ or coordinator/ (checked by import-linter).
"""
