"""Weight initializers for a fan-in x fan-out matrix (or a conv kernel).

Each is ``init(key, shape, dtype, fan_in, fan_out) -> array``:

* ``glorot`` (Glorot & Bengio 2010): uniform on [-a, a], a = sqrt(6 / (fan_in + fan_out)),
  so Var = 2 / (fan_in + fan_out).
* ``he`` (He et al. 2015): normal, Var = 2 / fan_in (for ReLU nets).
* ``lecun`` (LeCun 1998): normal, Var = 1 / fan_in (for tanh/SELU nets).
"""
from __future__ import annotations

import math

import jax


def glorot(key, shape, dtype, fan_in, fan_out):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def he(key, shape, dtype, fan_in, fan_out):
    del fan_out
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)


def lecun(key, shape, dtype, fan_in, fan_out):
    del fan_out
    return jax.random.normal(key, shape, dtype) * math.sqrt(1.0 / fan_in)


INITIALIZERS = {"glorot": glorot, "he": he, "lecun": lecun}


def get(name_or_fn):
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INITIALIZERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown initializer {name_or_fn!r}; choose one of "
                         f"{sorted(INITIALIZERS)} or pass a function") from None
