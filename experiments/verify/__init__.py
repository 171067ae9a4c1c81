"""Verification runs: every layer's gradients on a device, the per-layer error table."""
