"""The Bouquet client: a long-lived Flower client that never touches the GPU itself.

It holds the global weights as numpy arrays and runs every fit and evaluate in a fresh
worker process (``services.worker``), so nothing a round allocates outlives the round.
"""
