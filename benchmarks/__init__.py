"""Bouquet's benchmark: the same federation under in-process, spawn, forkserver and Flower's
Deployment Engine, measured side by side. Entry point: ``scripts/bench.py``."""
