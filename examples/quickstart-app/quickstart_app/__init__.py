"""quickstart-app: a Flower App on scikit-learn's digits, for Bouquet's app mode and Flower's own Deployment Engine."""
