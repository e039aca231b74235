"""The coordinator: membership, heartbeats, the training-ready barrier, telemetry, metrics.

It never touches a tensor. Its pydantic schemas (``coordinator.models``) are the HTTP contract.
"""
