r"""Normalization layers: batch norm, layer norm, group norm (channels last).

All three standardize x over a set R of axes, then scale and shift per channel
c with learnable gamma (``"scale"``) and beta (``"offset"``), both (C,). With
m = |R| the number of entries each statistic averages::

    mu   = (1/m) sum_R x                    (mean)
    var  = (1/m) sum_R (x - mu)^2           (biased variance)
    r    = 1 / sqrt(var + eps)
    xhat = (x - mu) r
    y    = gamma xhat + beta

They differ only in R:

| layer       | R (for x of shape (N, L..., C))              | statistics per      |
|-------------|----------------------------------------------|---------------------|
| batch_norm  | batch and spatial axes (N, L...)             | channel             |
| layer_norm  | the last axis (C)                            | example, position   |
| group_norm  | spatial axes and the C/G channels of a group | example, group      |

Backward (one derivation for all three). From y: dxhat = gamma dY,
dgamma = sum_{all but C} dY xhat, dbeta = sum_{all but C} dY. Through xhat
= (x - mu) r, x reaches xhat along three paths: directly, through mu, and
through var (which depends on x directly and through mu). With
d mu / dx_i = 1/m, d var / dx_i = (2/m)(x_i - mu) (the mu path of var
vanishes because sum_R (x - mu) = 0), and d r / d var = -r^3 / 2::

    dx_i = r dxhat_i - (r/m) sum_R dxhat - (r^3/m) (x_i - mu) sum_R dxhat (x - mu)
         = r (dxhat_i - mean_R(dxhat) - xhat_i mean_R(dxhat xhat))

(the second line substitutes (x - mu) r = xhat). A uniform dY hides a wrong
last term (sum_R xhat = 0), which is why the tests use random cotangents.
In evaluation mode batch norm uses fixed running statistics, so mu and r are
constants and ``dx = gamma r dY`` per channel.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxprop.core import Layer, check_float, check_input, check_same_shape, default_float


def _standardize(x, axes, eps):
    """xhat = (x - mu) r over ``axes`` (keepdims). Returns xhat, mu, var, r."""
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=axes, keepdims=True)
    r = 1.0 / jnp.sqrt(var + eps)
    return xc * r, mu, var, r


def _standardize_backward(dxhat, xhat, r, axes):
    """dx = r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)): the module docstring's result."""
    return r * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


def _channel(v, ndim):
    """(C,) -> (1, ..., 1, C): explicit broadcasting over the leading axes."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[0],))


def _affine_params(name, in_shape, dtype, min_rank=2):
    in_shape = tuple(in_shape)
    if len(in_shape) < min_rank:
        raise ValueError(f"{name}: in_shape must be (N, ..., C) with rank >= {min_rank}, got {in_shape}")
    dt = dtype or default_float()
    c = in_shape[-1]
    return in_shape, {"scale": jnp.ones((c,), dt), "offset": jnp.zeros((c,), dt)}


def _check_x(name, x, params, min_rank=2):
    check_float(name, x)
    check_input(name, x, min_ndim=min_rank, what="input (N, ..., C)")
    check_input(name, x, last=params["scale"].shape[0], dtype=params["scale"].dtype)


def _affine_backward(cache, dy, axes_all_but_c):
    """y = gamma xhat + beta  ->  dgamma, dbeta, dxhat."""
    xhat, gamma = cache["xhat"], cache["scale"]
    grads = {"scale": (dy * xhat).sum(axis=axes_all_but_c),     # forward was: y = gamma xhat + ...
             "offset": dy.sum(axis=axes_all_but_c)}             # forward was: y = ... + beta
    return grads, dy * _channel(gamma, dy.ndim)


def batch_norm(momentum: float = 0.9, *, eps: float = 1e-5, dtype=None) -> Layer:
    r"""Batch normalization (Ioffe & Szegedy 2015) over (N, ..., C), per channel.

    Training (``train=True``): statistics of the batch, R = every axis but the
    last (m = N L...); forward and backward as in the module docstring::

        y = gamma (x - mu_B) / sqrt(var_B + eps) + beta              (N, ..., C)
        dX = r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)),  dxhat = gamma dY
        dgamma = sum_R dY xhat (C,)     dbeta = sum_R dY (C,)

    Evaluation (``train=False``): the running statistics of ``state`` replace
    mu_B, var_B; they are constants, so ``dX = gamma dY / sqrt(var + eps)``.

    State (never touched by the optimizer): ``{"mean": (C,), "var": (C,)}``,
    starting at 0 and 1. After each training step
    ``update_state(state, cache)`` returns the exponential moving averages::

        mean <- momentum mean + (1 - momentum) mu_B
        var  <- momentum var  + (1 - momentum) var_B

    (Flax's convention: momentum weights the old value, and var_B is the
    biased batch variance that normalized the batch; PyTorch's ``momentum``
    is 1 minus this one and it stores the unbiased variance.)
    ``jp.value_and_grad`` returns ``((J, new_state), grads)`` for a net with
    batch norm, and ``jp.init_state(net, in_shape)`` builds the first state.

    Args:
      momentum: weight of the old running value, in [0, 1).
      eps: added to the variance before the square root.
      dtype: parameter and state dtype (default: float64 under x64, else float32).

    Params: ``{"scale": (C,), "offset": (C,)}`` (gamma = 1, beta = 0 at init).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"batch_norm: momentum must be in [0, 1), got {momentum}")
    name = f"batch_norm({momentum})"

    def init(key, in_shape):
        del key
        return _affine_params(name, in_shape, dtype)

    def init_state(in_shape):
        c = tuple(in_shape)[-1]
        dt = dtype or default_float()
        return {"mean": jnp.zeros((c,), dt), "var": jnp.ones((c,), dt)}

    def forward(params, x, *, state=None, train=True):
        _check_x(name, x, params)
        axes = tuple(range(x.ndim - 1))
        gamma, beta = params["scale"], params["offset"]
        if train:
            xhat, mu, var, r = _standardize(x, axes, eps)
            cache = {"xhat": xhat, "r": r, "scale": gamma,
                     "batch_mean": mu.reshape(-1), "batch_var": var.reshape(-1)}
        else:
            if state is None:
                raise ValueError(f"{name}: evaluation (train=False) needs the running statistics: "
                                 "pass state=jp.init_state(net, in_shape) (or the trained state)")
            mu = _channel(state["mean"].astype(x.dtype), x.ndim)
            r = 1.0 / jnp.sqrt(_channel(state["var"].astype(x.dtype), x.ndim) + eps)
            cache = {"xhat": (x - mu) * r, "r": r, "scale": gamma}
        y = _channel(gamma, x.ndim) * cache["xhat"] + _channel(beta, x.ndim)
        return y, cache

    def backward(cache, dy):
        check_same_shape(name, cache["xhat"], dy)
        axes = tuple(range(dy.ndim - 1))
        grads, dxhat = _affine_backward(cache, dy, axes)
        if "batch_mean" in cache:                 # training: mu_B and var_B depend on x
            dx = _standardize_backward(dxhat, cache["xhat"], cache["r"], axes)
        else:                                     # evaluation: forward was xhat = (x - mean) r, r constant
            dx = dxhat * cache["r"]
        return grads, dx

    def update_state(state, cache):
        if "batch_mean" not in cache:             # an evaluation pass leaves the state alone
            return state
        return {k: momentum * state[k] + (1.0 - momentum) * cache["batch_" + k].astype(state[k].dtype)
                for k in ("mean", "var")}

    return Layer(init, forward, backward, name=name, init_state=init_state, update_state=update_state)


def layer_norm(*, eps: float = 1e-5, dtype=None) -> Layer:
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the last axis.

    For x (N, ..., C), every vector x[n, ..., :] is standardized over its C
    features (R = the last axis, m = C), as Flax's and PyTorch's LayerNorm
    with the default normalized shape; then scaled and shifted per feature::

        y = gamma (x - mu) / sqrt(var + eps) + beta                 (N, ..., C)
        dX = r (dxhat - mean_C dxhat - xhat mean_C(dxhat xhat)),  dxhat = gamma dY
        dgamma = sum_{N,...} dY xhat (C,)     dbeta = sum_{N,...} dY (C,)

    Same computation in training and evaluation (no state). For a CNN,
    ``group_norm(1)`` normalizes over every non-batch axis instead.

    Params: ``{"scale": (C,), "offset": (C,)}`` (gamma = 1, beta = 0 at init).
    """
    name = "layer_norm"

    def init(key, in_shape):
        del key
        return _affine_params(name, in_shape, dtype)

    def forward(params, x):
        _check_x(name, x, params)
        xhat, _, _, r = _standardize(x, (x.ndim - 1,), eps)
        y = _channel(params["scale"], x.ndim) * xhat + _channel(params["offset"], x.ndim)
        return y, {"xhat": xhat, "r": r, "scale": params["scale"]}

    def backward(cache, dy):
        check_same_shape(name, cache["xhat"], dy)
        grads, dxhat = _affine_backward(cache, dy, tuple(range(dy.ndim - 1)))
        # forward was: xhat = (x - mu) r over the last axis
        return grads, _standardize_backward(dxhat, cache["xhat"], cache["r"], (dy.ndim - 1,))

    return Layer(init, forward, backward, name=name)


def group_norm(groups: int, *, eps: float = 1e-5, dtype=None) -> Layer:
    r"""Group normalization (Wu & He 2018) over (N, ..., C): C split into G groups.

    x is viewed as (N, ..., G, C/G); each example's group g is standardized
    over its spatial positions and its C/G channels (R = spatial axes and
    the last, m = L... C/G). Then gamma, beta per channel::

        y = gamma (x - mu_ng) / sqrt(var_ng + eps) + beta           (N, ..., C)
        dX = r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)),  dxhat = gamma dY
        dgamma = sum_{N,...} dY xhat (C,)     dbeta = sum_{N,...} dY (C,)

    (the mean_R and xhat taken in the grouped view). ``groups=1`` normalizes
    each example over all its entries; ``groups=C`` is instance norm. No
    state: training and evaluation agree.

    Args:
      groups: G, must divide the channel count C.

    Params: ``{"scale": (C,), "offset": (C,)}`` (gamma = 1, beta = 0 at init).
    """
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"group_norm: groups must be a positive int, got {groups!r}")
    name = f"group_norm({groups})"

    def grouped(shape):
        if shape[-1] % groups:
            raise ValueError(f"{name}: groups={groups} must divide the channel count; got input shape {shape}")
        return tuple(shape[:-1]) + (groups, shape[-1] // groups)

    def reduce_axes(ndim):
        return tuple(range(1, ndim - 2)) + (ndim - 1,)     # spatial axes and channels-in-group

    def init(key, in_shape):
        del key
        grouped(tuple(in_shape))
        return _affine_params(name, in_shape, dtype)

    def forward(params, x):
        _check_x(name, x, params)
        xg = x.reshape(grouped(x.shape))                        # (N, ..., G, C/G)
        xhat_g, _, _, r = _standardize(xg, reduce_axes(xg.ndim), eps)
        xhat = xhat_g.reshape(x.shape)
        y = _channel(params["scale"], x.ndim) * xhat + _channel(params["offset"], x.ndim)
        return y, {"xhat": xhat, "r": r, "scale": params["scale"]}

    def backward(cache, dy):
        check_same_shape(name, cache["xhat"], dy)
        grads, dxhat = _affine_backward(cache, dy, tuple(range(dy.ndim - 1)))
        gshape = grouped(dy.shape)
        # forward was: xhat_g = (xg - mu) r over (spatial, C/G), then reshaped back to (N, ..., C)
        dxg = _standardize_backward(dxhat.reshape(gshape), cache["xhat"].reshape(gshape), cache["r"],
                                    reduce_axes(len(gshape)))
        return grads, dxg.reshape(dy.shape)

    return Layer(init, forward, backward, name=name)
