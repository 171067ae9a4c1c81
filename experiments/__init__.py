"""jaxprop's experiment scripts, run as modules from the repository root (see README.md here)."""
