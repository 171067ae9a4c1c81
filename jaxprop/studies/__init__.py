"""Studies built on jaxprop, not part of its training API (not imported by ``import jaxprop``).

* :mod:`jaxprop.studies.complexity`: the complexity study's MLPs, the operation
  count (:class:`~jaxprop.studies.complexity.OpCount`, ``count_ops``), finite
  differences, forward mode and backprop, and the closed forms of their costs.
* :mod:`jaxprop.studies.paths`: the gradient by explicit enumeration of every
  path from a parameter to the cost, with its count.

Walk-through: docs/complexity.md; the scripts that run them: experiments/studies/.
These modules use ``jax.jvp`` as a reference method; jaxprop's own gradients never
come from here.
"""
from jaxprop.studies import complexity, paths

__all__ = ["complexity", "paths"]
