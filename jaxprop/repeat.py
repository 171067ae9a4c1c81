"""Old import path of :mod:`jaxprop.combinators.repeat` (kept for ``from jaxprop.repeat import ...``)."""
from jaxprop.combinators.repeat import repeat, stack_params, unstack_params  # noqa: F401

__all__ = ["repeat", "stack_params", "unstack_params"]
