"""Train a jaxprop model: ``python experiments/train.py [options]`` (same as ``jaxprop-train``).

With no options: the default experiment, an MLP on MNIST-1D with hand-written
gradients (about 10-20 s on 2 CPU cores). ``--help`` lists the options; the
runner itself is :mod:`jaxprop.cli`.
"""
import sys

from jaxprop.cli import main

if __name__ == "__main__":
    sys.exit(main())
