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

Two reductions instead of four (batch norm). The line above reduces over R
twice (mean_R dxhat, mean_R dxhat xhat), and the parameter gradients reduce
twice more over "all axes but C". For batch norm these are the same axes, R,
and gamma is constant on each set R (one channel), so with dxhat = gamma dY::

    mean_R(dxhat)      = gamma (1/m) sum_R dY      = gamma dbeta / m
    mean_R(dxhat xhat) = gamma (1/m) sum_R dY xhat = gamma dgamma / m
    dx = gamma r (dY - dbeta/m - xhat dgamma/m)                      (N, ..., C)

so dx reuses the two sums the parameter gradients compute anyway (one pass
over dY and xhat for both sums, one elementwise pass for dx).

Group norm: gamma varies inside a group (R = spatial x C/G channels), so
mean_R(dxhat) is not dbeta/m and the identity above does not apply as such.
But all four sums factor through two per-(example, channel) spatial sums
of the full tensors, S1[n,c] = sum_L dY and S2[n,c] = sum_L dY xhat::

    dbeta = sum_n S1                  mean_R(dxhat)[n,g]      = (1/m) sum_{c in g} gamma_c S1[n,c]
    dgamma = sum_n S2                 mean_R(dxhat xhat)[n,g] = (1/m) sum_{c in g} gamma_c S2[n,c]

so group norm also reduces the full tensors twice; the rest are (N, C)
sums. Layer norm: R is the channel axis itself while dgamma, dbeta sum
over the other axes, so no partial sum is shared and the four reductions
stay (they run along different axes: no identity to use).

Numerics: shifted two-pass statistics. mu is computed as k + mean_R(x - k)
with k one entry of each set R (the first), and var = mean_R((x - mu)^2) from
the centred values. In exact arithmetic k cancels; in floating point x - k is
exact for near-constant data (Sterbenz), so a constant input gives xhat = 0
exactly, where mean_R(x) itself is off by an ulp of |x| (for 12345.678 in
float32, 1e-3, which eps = 1e-5 turns into xhat = 0.3). The backward works
from the cached xhat and r, so it inherits the accuracy. k enters through
``lax.stop_gradient``: y does not depend on k (its derivative is exactly
zero), so jax.grad, the tests' reference, need not carry that path; the
hand-written backward never differentiates the forward at all.

Per example (:mod:`jaxprop.per_example`): layer norm and group norm
standardize each example on its own, so example n's gradients are the sums
above without the sum over n, (N, C) each::

    dgamma_n = sum_{L...} dY_n xhat_n        dbeta_n = sum_{L...} dY_n

Batch norm in evaluation mode (fixed statistics) likewise; in training mode
every output depends on the whole batch through mu_B and var_B, so there is
no per-example gradient: it raises ``PerExampleUnsupported`` and suggests
group norm (as Opacus does).

Degenerate sets: m = 0 (e.g. an empty batch in batch norm) raises a
ValueError (mu and var are undefined: NaN running statistics); m = 1 warns
once per layer (xhat = 0, so the output is beta and dx = 0).
"""
from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.core import Layer, PerExampleUnsupported, check_float, check_input, check_same_shape, default_float
from jaxprop.layers._params import check_params

# Batch norm's backward: True = the two-reduction identity of the module docstring; False = the
# generic four-reduction _standardize_backward. Private, read when batch_norm() builds a layer (not
# at trace time, so jit caches cannot mix the two): for A/B benchmarks only
# (experiments/bench/norm_backward.py); both give the same gradients to rounding.
_BN_TWO_REDUCTIONS = True
# Group norm's backward through per-(example, channel) spatial sums (module docstring); same A/B use.
_GN_FACTORED = True


def _first(ndim, axes):
    """Index of the first entry along ``axes`` (keepdims): one sample of each set R."""
    return tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))


def _standardize(x, axes, eps):
    """xhat = (x - mu) r over ``axes`` (keepdims), shifted two-pass. Returns xhat, mu, var, r."""
    k = lax.stop_gradient(x[_first(x.ndim, axes)])  # shift: one entry of R; y does not depend on it
    d = x - k                                       # exact for near-constant x
    d_mu = d.mean(axis=axes, keepdims=True)
    xc = d - d_mu                                   # x - mu, with mu = k + d_mu
    var = (xc * xc).mean(axis=axes, keepdims=True)  # second pass, on centred values
    r = 1.0 / jnp.sqrt(var + eps)
    return xc * r, k + d_mu, var, r


def _standardize_backward(dxhat, xhat, r, axes):
    """dx = r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)): the module docstring's result."""
    return r * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


def _standardize_backward_per_channel(dy, xhat, r, gamma, grads, m):
    """dx = gamma r (dy - dbeta/m - xhat dgamma/m), for R = every axis but C (batch norm):
    mean_R(dxhat) = gamma dbeta/m and mean_R(dxhat xhat) = gamma dgamma/m (module docstring)."""
    nd = dy.ndim
    g, db, dg = (_channel(v, nd) for v in (gamma, grads["offset"], grads["scale"]))
    return (g * r) * (dy - db / m - xhat * (dg / m))


def _check_count(name, x_shape, m, what, warned):
    """m = 0 entries per statistic: ValueError; m = 1: warn once per layer (constant output)."""
    if m == 0:
        raise ValueError(f"{name}: nothing to normalize over: {what} of the input of shape {tuple(x_shape)} "
                         "hold 0 entries, so the mean and variance are undefined (an empty batch?)")
    if m == 1 and not warned:
        warned.append(True)
        warnings.warn(f"{name}: one entry per statistic ({what} of the input of shape {tuple(x_shape)}): "
                      "output is constant and gradients are zero (xhat = 0: dx = dgamma = 0); use a larger batch or "
                      "another normalization", UserWarning, stacklevel=4)
    return m


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


_SPEC = {"scale": ("C",), "offset": ("C",)}


def _check_x(name, x, params, min_rank=2):
    """Params {"scale": (C,), "offset": (C,)}, one float dtype; x (N, ..., C) of that dtype."""
    sizes, dt = check_params(name, params, _SPEC)
    check_float(name, x)
    check_input(name, x, min_ndim=min_rank, what="input (N, ..., C)")
    check_input(name, x, last=sizes["C"], dtype=dt)


def _affine_backward(cache, dy, axes_all_but_c):
    """y = gamma xhat + beta  ->  dgamma, dbeta, dxhat."""
    xhat, gamma = cache["xhat"], cache["scale"]
    grads = {"scale": (dy * xhat).sum(axis=axes_all_but_c),     # forward was: y = gamma xhat + ...
             "offset": dy.sum(axis=axes_all_but_c)}             # forward was: y = ... + beta
    return grads, dy * _channel(gamma, dy.ndim)


def _affine_per_example(cache, dy):
    """Per example (N, C): dgamma_n = sum_{positions} dY_n xhat_n, dbeta_n = sum_{positions} dY_n."""
    middle = tuple(range(1, dy.ndim - 1))
    return {"scale": (dy * cache["xhat"]).sum(axis=middle),    # forward was: y = gamma xhat + ...
            "offset": dy.sum(axis=middle)}                    # forward was: y = ... + beta


def _with_per_example(layer: Layer, refuse=None) -> Layer:
    """``layer`` with the per-example rules of its scale and offset (:func:`_affine_per_example`);
    dx is the layer's own backward's. ``refuse(cache)``: raise when the examples are mixed."""

    def per_example(cache, dy):
        if refuse is not None:
            refuse(cache)
        check_same_shape(layer.name, cache["xhat"], dy)
        return _affine_per_example(cache, dy), layer.backward(cache, dy)[1]

    def per_example_norms(cache, dy):
        grads, dx = per_example(cache, dy)
        return (grads["scale"] ** 2).sum(axis=1) + (grads["offset"] ** 2).sum(axis=1), dx

    return layer._replace(per_example=per_example, per_example_norms=per_example_norms)


def batch_norm(momentum: float = 0.9, *, eps: float = 1e-5, dtype=None) -> Layer:
    r"""Batch normalization (Ioffe & Szegedy 2015) over (N, ..., C), per channel.

    Training (``train=True``): statistics of the batch, R = every axis but the
    last (m = N L...); forward and backward as in the module docstring::

        y = gamma (x - mu_B) / sqrt(var_B + eps) + beta              (N, ..., C)
        dgamma = sum_R dY xhat (C,)     dbeta = sum_R dY (C,)
        dX = gamma r (dY - dbeta/m - xhat dgamma/m)                  (N, ..., C)

    (the general r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)) with
    its two means read off dbeta and dgamma: two reductions, not four).
    A batch with m = 0 raises; m = 1 (one example, no spatial axes) warns
    once: the output is then beta and every gradient but dbeta is zero.

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
    warned = []
    two_reductions = _BN_TWO_REDUCTIONS

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
            _check_count(name, x.shape, math.prod(x.shape[:-1]), "the batch and spatial axes", warned)
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
        if "batch_mean" in cache and two_reductions:      # training: mu_B and var_B depend on x
            m = math.prod(dy.shape[:-1])
            # forward was: xhat = (x - mu_B) r over R = axes; means read off dbeta, dgamma
            dx = _standardize_backward_per_channel(dy, cache["xhat"], cache["r"], cache["scale"], grads, m)
        elif "batch_mean" in cache:               # the same, with four reductions (A/B reference)
            dx = _standardize_backward(dxhat, cache["xhat"], cache["r"], axes)
        else:                                     # evaluation: forward was xhat = (x - mean) r, r constant
            dx = dxhat * cache["r"]
        return grads, dx

    def update_state(state, cache):
        if "batch_mean" not in cache:             # an evaluation pass leaves the state alone
            return state
        return {k: momentum * state[k] + (1.0 - momentum) * cache["batch_" + k].astype(state[k].dtype)
                for k in ("mean", "var")}

    def refuse(cache):
        if "batch_mean" in cache:
            raise PerExampleUnsupported(
                f"{name}: batch norm in training mode mixes the examples of a batch (every output depends "
                "on the batch statistics), so an example's gradient is not defined and DP-SGD's clipping "
                "would not bound it; use group_norm (or layer_norm) instead, or batch norm with train=False")

    return _with_per_example(Layer(init, forward, backward, name=name, init_state=init_state,
                                   update_state=update_state), refuse)


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
    warned = []

    def init(key, in_shape):
        del key
        return _affine_params(name, in_shape, dtype)

    def forward(params, x):
        _check_x(name, x, params)
        _check_count(name, x.shape, x.shape[-1], "the last axis", warned)
        xhat, _, _, r = _standardize(x, (x.ndim - 1,), eps)
        y = _channel(params["scale"], x.ndim) * xhat + _channel(params["offset"], x.ndim)
        return y, {"xhat": xhat, "r": r, "scale": params["scale"]}

    def backward(cache, dy):
        check_same_shape(name, cache["xhat"], dy)
        grads, dxhat = _affine_backward(cache, dy, tuple(range(dy.ndim - 1)))
        # forward was: xhat = (x - mu) r over the last axis
        return grads, _standardize_backward(dxhat, cache["xhat"], cache["r"], (dy.ndim - 1,))

    return _with_per_example(Layer(init, forward, backward, name=name))


def group_norm(groups: int, *, eps: float = 1e-5, dtype=None) -> Layer:
    r"""Group normalization (Wu & He 2018) over (N, ..., C): C split into G groups.

    x is viewed as (N, ..., G, C/G); each example's group g is standardized
    over its spatial positions and its C/G channels (R = spatial axes and
    the last, m = L... C/G). Then gamma, beta per channel::

        y = gamma (x - mu_ng) / sqrt(var_ng + eps) + beta           (N, ..., C)
        dX = r (dxhat - mean_R dxhat - xhat mean_R(dxhat xhat)),  dxhat = gamma dY
        dgamma = sum_{N,...} dY xhat (C,)     dbeta = sum_{N,...} dY (C,)

    (the mean_R and xhat taken in the grouped view). All four sums are
    computed from two spatial sums S1 = sum_L dY, S2 = sum_L dY xhat, each
    (N, C), as the module docstring derives: two passes over the full
    tensors instead of four. ``groups=1`` normalizes
    each example over all its entries; ``groups=C`` is instance norm. No
    state: training and evaluation agree.

    Args:
      groups: G, must divide the channel count C.

    Params: ``{"scale": (C,), "offset": (C,)}`` (gamma = 1, beta = 0 at init).
    """
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"group_norm: groups must be a positive int, got {groups!r}")
    name = f"group_norm({groups})"
    warned = []
    factored = _GN_FACTORED

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
        gshape = grouped(x.shape)                               # (N, ..., G, C/G): shape only
        _check_count(name, x.shape, math.prod(gshape[a] for a in reduce_axes(len(gshape))),
                     "the spatial axes and C/G channels of a group", warned)
        xhat, r = _group_standardize(x, groups, eps)
        y = _channel(params["scale"], x.ndim) * xhat + _channel(params["offset"], x.ndim)
        return y, {"xhat": xhat, "r": r, "scale": params["scale"]}

    def backward(cache, dy):
        check_same_shape(name, cache["xhat"], dy)
        if factored:
            return _group_norm_backward_factored(cache, dy, groups)
        grads, dxhat = _affine_backward(cache, dy, tuple(range(dy.ndim - 1)))
        gshape = grouped(dy.shape)
        r_g = cache["r"].reshape((gshape[0],) + (1,) * (len(gshape) - 3) + (groups, 1))
        # forward was: xhat_g = (xg - mu) r over (spatial, C/G), in the grouped view (N, ..., G, C/G)
        dxg = _standardize_backward(dxhat.reshape(gshape), cache["xhat"].reshape(gshape), r_g,
                                    reduce_axes(len(gshape)))
        return grads, dxg.reshape(dy.shape)

    return _with_per_example(Layer(init, forward, backward, name=name))


def _membership(c, groups, dtype):
    """(C, G) one-hot: E[c, g] = 1 where channel c is in group g (c // (C/G) = g)."""
    return (jnp.arange(c)[:, None] // (c // groups) == jnp.arange(groups)[None, :]).astype(dtype)


def _per_group(s, groups):
    """(N, C) -> (N, G): the sum over each group's C/G channels, s E."""
    return jnp.dot(s, _membership(s.shape[-1], groups, s.dtype), precision=lax.Precision.HIGHEST)


def _to_channels(v, cg, ndim):
    """(N, G) -> (N, 1..., C): each group's value on its C/G channels, v E^T (exact: one term)."""
    e = _membership(v.shape[-1] * cg, v.shape[-1], v.dtype)
    c = jnp.dot(v, e.T, precision=lax.Precision.HIGHEST)
    return c.reshape((c.shape[0],) + (1,) * (ndim - 2) + (c.shape[1],))


def _group_standardize(x, groups, eps):
    """Group norm's xhat over (N, ..., C), shifted two-pass (module docstring), computed in the
    flat layout: spatial sums (N, C) first, then (N, G) sums over each group's channels, and
    (N, G) statistics broadcast back over channels. The grouped view (N, ..., G, C/G) would give
    the same numbers, but reducing it over its non-adjacent axes (spatial and C/G) is slow on
    XLA:CPU (the CNN's step 1.5x slower). Returns xhat (N, ..., C) and r (N, G)."""
    nd, cg = x.ndim, x.shape[-1] // groups
    spatial = tuple(range(1, nd - 1))
    m = math.prod(x.shape[1:-1]) * cg
    first = (slice(None),) + (0,) * (nd - 2) + (slice(None, None, cg),)
    k = lax.stop_gradient(x[first])                     # (N, G): one entry of each set R (shift)
    d = x - _to_channels(k, cg, nd)                     # exact for near-constant x
    d_mu = _per_group(d.sum(axis=spatial), groups) / m  # (N, G)
    xc = d - _to_channels(d_mu, cg, nd)                 # x - mu, with mu = k + d_mu
    var = _per_group((xc * xc).sum(axis=spatial), groups) / m   # second pass, on centred values
    r = 1.0 / jnp.sqrt(var + eps)                       # (N, G)
    return xc * _to_channels(r, cg, nd), r


def _group_norm_backward_factored(cache, dy, groups):
    """Group norm's backward with two reductions over the full tensor (module docstring):
    S1[n,c] = sum_L dY, S2[n,c] = sum_L dY xhat; dbeta = sum_n S1, dgamma = sum_n S2;
    mean_R(dxhat)[n,g] = (1/m) sum_{c in g} gamma_c S1[n,c], mean_R(dxhat xhat) likewise with S2;
    dx = r (gamma dY - mean_R(dxhat) - xhat mean_R(dxhat xhat)), the (N, G) factors broadcast
    over each group's channels (the flat layout of :func:`_group_standardize`)."""
    xhat, gamma, r = cache["xhat"], cache["scale"], cache["r"]
    nd, cg = dy.ndim, dy.shape[-1] // groups
    spatial = tuple(range(1, nd - 1))
    m = math.prod(dy.shape[1:-1]) * cg
    s1 = dy.sum(axis=spatial)                                     # (N, C)
    s2 = (dy * xhat).sum(axis=spatial)                            # (N, C)
    grads = {"scale": s2.sum(axis=0),                             # forward was: y = gamma xhat + ...
             "offset": s1.sum(axis=0)}                            # forward was: y = ... + beta
    mean_dxhat = _per_group(gamma[None, :] * s1, groups) / m      # (N, G)
    mean_dxhat_xhat = _per_group(gamma[None, :] * s2, groups) / m
    # forward was: xhat = (x - mu) r per (example, group); dxhat = gamma dY (y = gamma xhat + beta)
    dx = _to_channels(r, cg, nd) * (dy * _channel(gamma, nd) - _to_channels(mean_dxhat, cg, nd)
                                    - xhat * _to_channels(mean_dxhat_xhat, cg, nd))
    return grads, dx
