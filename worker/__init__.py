"""The worker: everything that trains. One sub-package per concept, imports pointing down:

    cli/         the zerop2p command                         (top: may import everything)
    main.py      the wiring: builds the parts and runs generations
    train/       config, optimizer, the loop, the trainer's own state
    state/       checkpoints, buddy replicas, rescue, export: objects that save themselves
    engine/      sharding units and the ZeRO-3 engine, with its progress observers
    data/ models/ membership/ cluster/   independent of each other
    logs.py      the rank in every log line

Below worker/ sit ``communication`` (the wire) and ``coordinator.models`` (the HTTP contract).
The layers are checked by import-linter (pyproject.toml, ``lint-imports`` in ``make test``).
"""
