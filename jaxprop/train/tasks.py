"""A loss bound to a data set: which loss, how many outputs, how labels become targets."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

import numpy as np

from jaxprop import losses as losses_mod
from jaxprop.core import Loss
from jaxprop.data import Dataset


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss bound to a data set: the loss, the outputs the model needs, and
    how labels become the loss's targets."""

    name: str
    loss: Loss
    n_outputs: int
    targets: Callable[[np.ndarray], np.ndarray]


LOSS_ALIASES = {"ce": "softmax_cross_entropy", "cross_entropy": "softmax_cross_entropy",
                "bce": "sigmoid_binary_cross_entropy", "l2": "mse"}
LOSS_NAMES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse")


def default_loss(data: Dataset) -> str:
    return "softmax_cross_entropy" if data.n_classes else "mse"


@functools.lru_cache(maxsize=None)
def _loss(name: str) -> Loss:
    """One Loss object per name, so compiled steps can be reused across runs."""
    return getattr(losses_mod, name)()


def _same(y):
    return y


def loss_spec(loss: Union[str, Loss, None], data: Dataset) -> LossSpec:
    """Resolve ``loss`` (a name, a :class:`jaxprop.Loss`, or None for the data
    set's default) for ``data``.

    * ``softmax_cross_entropy`` (``ce``): classification; integer labels (N, ...);
      C outputs per position.
    * ``sigmoid_binary_cross_entropy`` (``bce``): two classes; targets
      ``y[..., None]`` as floats; 1 output (class 1 when the logit is > 0).
    * ``mse``: regression targets, or one-hot targets for classification (C outputs).

    A ``Loss`` object is used as is with the data set's labels/targets.
    """
    if isinstance(loss, Loss):
        return LossSpec(loss.name, loss, data.n_outputs, _same)
    name = LOSS_ALIASES.get(loss, loss) if loss is not None else default_loss(data)
    if name == "softmax_cross_entropy":
        if not data.n_classes:
            raise ValueError(f"loss {name}: needs a classification data set; {data.name} is regression (use mse)")
        return LossSpec(name, _loss(name), data.n_classes, _same)
    if name == "sigmoid_binary_cross_entropy":
        if data.n_classes != 2:
            raise ValueError(f"loss {name}: needs a two-class data set; {data.name} has "
                             f"{data.n_classes or 'no'} classes")
        return LossSpec(name, _loss(name), 1, lambda y: np.asarray(y, np.float32)[..., None])
    if name == "mse":
        if data.n_classes:
            c = data.n_classes
            return LossSpec(name, _loss(name), c, lambda y: np.eye(c, dtype=np.float32)[np.asarray(y)])
        return LossSpec(name, _loss(name), data.n_outputs, _same)
    raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSS_NAMES)} (aliases {sorted(LOSS_ALIASES)})")
