"""The Bouquet server: Flower's gRPC server with FedAvg, central evaluation and run records."""
