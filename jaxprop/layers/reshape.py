"""Shape-only layers: flatten and reshape. No parameters; backward reshapes back."""
from __future__ import annotations

import math

from jaxprop.core import Layer, check_input, check_same_shape, shape_token, token_shape
from jaxprop.layers._params import check_no_params


def reshape(shape) -> Layer:
    """y = x.reshape((N,) + shape) for x of shape (N, ...); dx = dy.reshape(x.shape).

    ``shape`` excludes the batch axis and may contain one -1.
    """
    target = tuple(shape)
    name = f"reshape({target})"

    def out_of(in_shape):
        size = math.prod(in_shape[1:])
        known = math.prod(d for d in target if d != -1)
        if target.count(-1) > 1 or (target.count(-1) == 0 and known != size) or \
                (target.count(-1) == 1 and (known == 0 or size % known)):
            raise ValueError(f"{name}: cannot reshape input of shape {tuple(in_shape)} "
                             f"(per-example size {size}) to (N,) + {target}")
        return (in_shape[0],) + tuple(size // known if d == -1 else d for d in target)

    def init(key, in_shape):
        del key
        return out_of(tuple(in_shape)), ()

    def forward(params, x):
        check_no_params(name, params)
        check_input(name, x, min_ndim=1)
        return x.reshape(out_of(x.shape)), {"x_shape": shape_token(x)}

    def backward(cache, dy):
        x_shape = token_shape(cache["x_shape"])
        check_same_shape(name, out_of(x_shape), dy)
        return (), dy.reshape(x_shape)             # forward was: y = x.reshape(...)

    return Layer(init, forward, backward, name=name)


def flatten() -> Layer:
    """(N, d1, d2, ...) -> (N, d1*d2*...); dx = dy.reshape(x.shape)."""
    return reshape((-1,))._replace(name="flatten")
