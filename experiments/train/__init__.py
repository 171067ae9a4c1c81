"""Training experiments run through the runner (jaxprop.runner / experiments/train.py)."""
