"""The Bouquet server: Flower's gRPC server with the chosen Flower strategy (any of the nine in strategies.py), central evaluation and run records."""
