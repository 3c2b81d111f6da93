"""Training: the one epoch loop every trained network uses, and RegAD's registration training."""
