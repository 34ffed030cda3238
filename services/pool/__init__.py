"""The host worker pool: ONE warm process per host that imported torch (and FL_WORKER_PRELOAD)
once and never initialises CUDA; every replica and the server ask it over a Unix socket to fork
a fresh worker per job, so twenty replicas cost one torch import, not twenty.

``wire`` is what both sides share (the socket's place, the messages, the client's connection;
below ``services.worker``); ``server`` is the pool itself (``python -m services.pool``).
"""
