"""Bouquet's federation as a Flower app for the Deployment Engine (see ../pyproject.toml)."""
