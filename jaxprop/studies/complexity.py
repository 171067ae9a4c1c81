r"""The complexity study: four ways to the gradient of an MLP's cost, each with
its operations counted in one unit.

The study's networks are MLPs ``dense -> act -> dense -> act -> ... -> dense
[-> act]`` with an MSE cost (:func:`mlp` builds one). Four methods compute
the same gradient dJ/dtheta:

=====================  ============================================  ==========================
method                 how                                           work, leading order
=====================  ============================================  ==========================
path enumeration       for every parameter, sum over every path      sum_k P_k * paths_k * 2(L-k)
                       to the cost of the product of the local
                       derivatives (:mod:`jaxprop.studies.paths`)
finite differences     ``(J(theta + h e_p) - J(theta - h e_p))/2h``  2 forward passes per parameter
forward mode           one JVP per parameter (``jax.jvp``)           ~3 forward passes per parameter
backprop               ``jp.value_and_grad`` (the reverse sweep)      ~3 forward passes in all
=====================  ============================================  ==========================

The unit (:class:`OpCount`) is the scalar floating-point operation, in three
kinds: ``mul`` (multiplications and divisions), ``add`` (additions and
subtractions) and ``other`` (elementwise nonlinear functions, comparisons,
selections: ``logistic``, ``tanh``, ``x > 0``, ``where``). Moving data
(reshape, transpose, broadcast, gather) is free. A matrix product
(M, K) @ (K, N) is M N K multiplications and M N (K - 1) additions.

Backprop, finite differences and forward mode are counted from the real
computation: :func:`count_ops` traces the function to a jaxpr (``jax.make_jaxpr``,
which runs nothing), drops the equations whose results are unused (what
``jax.jit`` would drop too) and adds up every remaining primitive. Path
enumeration counts its multiplications and additions as it goes. The closed
forms (``*_ops`` functions below, derived in docs/complexity.md) are tested
against those counts.

This file is verification code: forward mode uses ``jax.jvp``. jaxprop's
own gradients never come from here. The pieces :mod:`jaxprop.studies.paths`
shares with it are public here: :class:`MLP`, :func:`check_data`,
:func:`abstract_inputs`, :class:`OpCount`, :func:`count_ops`, ``ACTIVATION_COSTS``
and the closed forms.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxprop.combinators import serial
from jaxprop.core import Layer
from jaxprop.grad import value_and_grad
from jaxprop.layers import activations
from jaxprop.layers.dense import dense
from jaxprop.losses import mse


# ----------------------------------------------------------------------------- the unit

@dataclasses.dataclass(frozen=True)
class OpCount:
    """Scalar floating-point operations, by kind (Python ints: exact at any size).

    ``mul``: multiplications and divisions; ``add``: additions and
    subtractions; ``other``: nonlinear functions, comparisons, selections.
    ``total`` is their sum. ``a + b`` adds counts, ``k * a`` scales them.
    """

    mul: int = 0
    add: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.mul + self.add + self.other

    def __add__(self, o: "OpCount") -> "OpCount":
        return OpCount(self.mul + o.mul, self.add + o.add, self.other + o.other)

    def __mul__(self, k: int) -> "OpCount":
        return OpCount(self.mul * k, self.add * k, self.other * k)

    __rmul__ = __mul__

    def __str__(self):
        return f"{self.total:,} ops ({self.mul:,} mul, {self.add:,} add, {self.other:,} other)"


# ----------------------------------------------------------------------------- counting a jaxpr

_FREE = {"reshape", "broadcast_in_dim", "transpose", "convert_element_type", "squeeze",
         "expand_dims", "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad",
         "copy", "copy_p", "iota", "stop_gradient", "gather", "rev", "device_put", "split"}
_ADD = {"add", "sub", "add_any", "neg"}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "remat", "checkpoint"}       # run their inner jaxpr once
_MUL = {"mul", "div"}
_OTHER = {"logistic", "tanh", "exp", "exp2", "log", "log1p", "expm1", "erf", "erfc", "erf_inv",
          "gt", "ge", "lt", "le", "eq", "ne", "select_n", "max", "min", "abs", "sign", "sqrt",
          "rsqrt", "cbrt", "pow", "not", "and", "or", "is_finite", "clamp", "round", "floor",
          "ceil"}


def _size(var) -> int:
    return int(np.prod(var.aval.shape, dtype=np.int64)) if var.aval.shape else 1


def _eqn_cost(eqn) -> OpCount:
    name = eqn.primitive.name
    out = _size(eqn.outvars[0])
    if name in _FREE:
        return OpCount()
    if name in _ADD:
        return OpCount(add=out)
    if name in _MUL:
        return OpCount(mul=out)
    if name in _OTHER:
        return OpCount(other=out)
    if name == "square":
        return OpCount(mul=out)
    if name == "integer_pow":
        return OpCount(mul=out * max(abs(int(eqn.params["y"])) - 1, 0))
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        k = int(np.prod([shape[d] for d in lhs_contract], dtype=np.int64))
        return OpCount(mul=out * k, add=out * (k - 1))
    if name == "reduce_sum":
        return OpCount(add=_size(eqn.invars[0]) - out)
    if name in ("reduce_max", "reduce_min", "argmax", "argmin"):
        return OpCount(other=_size(eqn.invars[0]) - out)
    raise ValueError(f"count_ops: no cost rule for the primitive '{name}' "
                     f"(add it to jaxprop.studies.complexity if it does arithmetic)")


def _count_jaxpr(jaxpr, live_out):
    """Cost of the equations of ``jaxpr`` that the outputs flagged in
    ``live_out`` depend on (dead-code elimination, then a sum), and which
    inputs they read: ``(OpCount, [bool per invar])``."""
    from jax.extend.core import Literal, Var, jaxprs_in_params

    live = {v for v, keep in zip(jaxpr.outvars, live_out) if keep and isinstance(v, Var)}
    total = OpCount()
    for eqn in reversed(jaxpr.eqns):
        used = [isinstance(v, Var) and v in live for v in eqn.outvars]
        if not any(used):
            continue
        subs = list(jaxprs_in_params(eqn.params))
        if not subs:
            total = total + _eqn_cost(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
            continue
        if eqn.primitive.name not in _CALLS or len(subs) != 1 or len(subs[0].outvars) != len(eqn.outvars):
            raise ValueError(f"count_ops: cannot count the control-flow primitive "
                             f"'{eqn.primitive.name}' (write the study's functions without it)")
        inner, inner_live = _count_jaxpr(subs[0], used)
        total = total + inner
        live.update(v for v, k in zip(eqn.invars, inner_live) if k and not isinstance(v, Literal))
    return total, [v in live for v in jaxpr.invars]


def count_ops(fn, *args) -> OpCount:
    """Scalar operations that ``fn(*args)`` performs to produce its outputs.

    Traces ``fn`` with ``jax.make_jaxpr`` (nothing is executed), keeps only
    the equations its outputs depend on, and sums the per-primitive costs of
    the module docstring. Raises ``ValueError`` on a primitive with no cost
    rule (so nothing is silently counted as free) and on control flow.
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _count_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[0]


# ----------------------------------------------------------------------------- the study's nets

#: Per element, in (mul, add, other), read off jaxprop's code and JAX's JVP
#: rules (docs/complexity.md, section 5); tests/test_complexity.py checks them on the jaxprs,
#: so a change to an activation's forward or backward must be mirrored here.
#:   forward:   y = f(p)                      (jaxprop's activation forward)
#:   backward:  dp = dy * f'(p)               (jaxprop's activation backward)
#:   tangent:   dp_dot -> y_dot              (jax.jvp of the forward)
#:   deriv:     f'(p) alone, from y or p      (the local factor of path enumeration)
ACTIVATION_COSTS = {
    "sigmoid": dict(forward=(0, 0, 1), backward=(2, 1, 0), tangent=(2, 1, 0), deriv=(1, 1, 0)),
    "tanh": dict(forward=(0, 0, 1), backward=(2, 1, 0), tangent=(2, 2, 0), deriv=(1, 1, 0)),
    "relu": dict(forward=(0, 0, 4), backward=(0, 0, 1), tangent=(0, 0, 1), deriv=(0, 0, 1)),
}

#: The study's activations are the ones with counted costs, as jaxprop's layers.
_ACTIVATIONS = {name: getattr(activations, name) for name in ACTIVATION_COSTS}


class MLP(NamedTuple):
    """An MLP of the study: widths ``(n_0, ..., n_L)``, ``L`` dense layers.

    Layer ``k`` (0-based) maps ``X_k`` (N, n_k) to ``P_k = X_k W_k + b_k``
    (N, n_{k+1}) and ``X_{k+1} = f(P_k)``; ``Y = X_L``; ``J = mse(Y, T)``.
    Hidden layers always have ``activation``; the last has
    ``output_activation`` (``None``: linear output). Build with :func:`mlp`.
    """

    widths: tuple
    activation: str
    output_activation: Optional[str]
    bias: bool

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    def act(self, k: int) -> Optional[str]:
        """The activation after dense layer ``k`` (``None``: none)."""
        return self.activation if k < self.depth - 1 else self.output_activation

    @property
    def layers(self) -> tuple:
        out = []
        for k in range(self.depth):
            out.append(dense(self.widths[k + 1], bias=self.bias))
            if self.act(k) is not None:
                out.append(_ACTIVATIONS[self.act(k)]())
        return tuple(out)

    @property
    def net(self) -> Layer:
        """The jaxprop network: ``serial(dense, act, dense, act, ...)``."""
        return serial(*self.layers)

    def dense_index(self, k: int) -> int:
        """Position of dense layer ``k`` in ``net``'s params tuple."""
        return 2 * k

    def init(self, key, batch: int = 1):
        """Parameters of ``net`` for inputs of shape (batch, n_0)."""
        _, params = self.net.init(key, (batch, self.widths[0]))
        return params

    @property
    def n_weights(self) -> int:
        w = self.widths
        return sum(w[k] * w[k + 1] for k in range(self.depth))

    @property
    def n_params(self) -> int:
        w = self.widths
        return sum((w[k] + self.bias) * w[k + 1] for k in range(self.depth))

    def __str__(self):
        out = self.output_activation or "linear"
        return f"{'-'.join(map(str, self.widths))} {self.activation}/{out}{'' if self.bias else ', no bias'}"


_SAME = "same"


def mlp(widths, activation: str = "sigmoid", *, output_activation: Optional[str] = _SAME,
        bias: bool = True) -> MLP:
    """An MLP of the study, e.g. ``mlp((2, 2, 1))`` (the 2-2-1 network).

    Args:
      widths: ``(n_0, ..., n_L)``, at least two positive ints (input and output).
      activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``, after every hidden layer.
      output_activation: after the last layer; default the same as
        ``activation`` (as the design notes' simplest network); ``None`` for a
        linear output.
      bias: whether each dense layer has a bias.
    """
    try:
        widths = tuple(widths)
    except TypeError:
        raise ValueError(f"mlp: widths must be a sequence of positive ints, got {widths!r}") from None
    if len(widths) < 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                                  and n >= 1 for n in widths):
        raise ValueError(f"mlp: widths must be at least two positive ints (input and output "
                         f"widths), got {widths!r}")
    if output_activation == _SAME:
        output_activation = activation
    for what, a in (("activation", activation), ("output_activation", output_activation)):
        if a is not None and a not in _ACTIVATIONS or (what == "activation" and a is None):
            raise ValueError(f"mlp: {what} must be one of {sorted(_ACTIVATIONS)}"
                             f"{' or None' if what == 'output_activation' else ''}, got {a!r}")
    return MLP(tuple(int(n) for n in widths), activation, output_activation, bool(bias))


def check_data(model: MLP, params, x, y, who: str) -> None:
    """Raise ``ValueError`` (naming ``who``) unless ``model`` is an :class:`MLP`,
    ``x`` is (N, n_0), ``y`` is (N, n_L) and ``params`` is ``model.init``'s tuple."""
    if not isinstance(model, MLP):
        raise ValueError(f"{who}: model must be a jaxprop.studies.complexity.MLP (build it with mlp(...)), "
                         f"got {type(model).__name__}")
    n0, nl = model.widths[0], model.widths[-1]
    if np.ndim(x) != 2 or np.shape(x)[1] != n0:
        raise ValueError(f"{who}: expected x of shape (N, {n0}) for the {model} network, got {np.shape(x)}")
    if np.shape(y) != (np.shape(x)[0], nl):
        raise ValueError(f"{who}: expected y of shape ({np.shape(x)[0]}, {nl}), got {np.shape(y)}")
    if not isinstance(params, tuple) or len(params) != len(model.layers):
        raise ValueError(f"{who}: params must be the tuple returned by model.init (one entry per "
                         f"layer of {model.net.name})")
    for k in range(model.depth):
        w = params[model.dense_index(k)]["w"]
        if tuple(w.shape) != (model.widths[k], model.widths[k + 1]):
            raise ValueError(f"{who}: W{k} has shape {tuple(w.shape)}, expected "
                             f"{(model.widths[k], model.widths[k + 1])}")


def cost(model: MLP, params, x, y):
    """J = mse(net(x), y): one forward pass of jaxprop's network and loss."""
    pred, _ = model.net.forward(params, x)
    return mse().forward(pred, y)[0]


# ----------------------------------------------------------------------------- the methods

class GradientResult(NamedTuple):
    """A gradient with its cost.

    Attributes:
      grads: same pytree as the params.
      ops: the :class:`OpCount` of the whole computation.
      evaluations: what the method repeats: 1 (backprop sweep), forward passes
        (finite differences), JVPs (forward mode) or path products summed
        (path enumeration, over the batch).
      method: ``"backprop"``, ``"finite_differences"``, ``"forward_mode"``, ``"paths"``.
    """

    grads: Any
    ops: OpCount
    evaluations: int
    method: str


@functools.lru_cache(maxsize=256)
def _backprop_kernel(model: MLP):
    return jax.jit(value_and_grad(model.net, mse()))


def abstract_inputs(model: MLP, n: int, dtype: str):
    """``(params, x, y)`` of ``model`` for a batch of n as ``jax.ShapeDtypeStruct``
    trees (nothing is allocated): what :func:`count_ops` traces on."""
    dt = jnp.dtype(dtype)
    x = jax.ShapeDtypeStruct((n, model.widths[0]), dt)
    y = jax.ShapeDtypeStruct((n, model.widths[-1]), dt)
    params = jax.eval_shape(lambda: jax.tree_util.tree_map(
        lambda a: a.astype(dt), model.init(jax.random.key(0), n)))
    return params, x, y


def dtype_name(params) -> str:
    """The floating dtype of a params tree, as a hashable name (``"float64"``)."""
    return jnp.result_type(*jax.tree_util.tree_leaves(params)).name


@functools.lru_cache(maxsize=256)
def _count_cached(kind: str, model: MLP, n: int, dtype: str) -> OpCount:
    """count_ops of one method's unit of work, traced on abstract shapes."""
    params, x, y = abstract_inputs(model, n, dtype)
    vg = value_and_grad(model.net, mse())
    if kind == "backprop":                       # the gradient only, as jp.grad
        return count_ops(lambda p, xx, yy: vg(p, xx, yy)[1], params, x, y)
    if kind == "cost":                           # one forward pass, up to J
        return count_ops(lambda p, xx, yy: cost(model, p, xx, yy), params, x, y)
    if kind == "jvp":                            # one JVP, the tangent of J only
        return count_ops(lambda p, t, xx, yy: jax.jvp(lambda q: cost(model, q, xx, yy), (p,), (t,))[1],
                         params, params, x, y)
    raise ValueError(kind)


def backprop_gradient(model: MLP, params, x, y) -> GradientResult:
    """jaxprop's engine: ``jp.value_and_grad(model.net, jp.mse())`` (jitted).

    ``ops`` counts the jaxpr of the gradient (forward, loss backward, the
    reverse sweep through every layer), after dead-code elimination: the
    first layer's ``dX`` is computed by ``dense.backward`` but never used, so
    ``jit`` drops it and so does the count.
    """
    check_data(model, params, x, y, "backprop_gradient")
    _, grads = _backprop_kernel(model)(params, x, y)
    ops = _count_cached("backprop", model, int(np.shape(x)[0]), dtype_name(params))
    return GradientResult(grads, ops, 1, "backprop")


def _chunks(p: int, chunk: int):
    """Index blocks of equal length ``chunk`` (the last one padded), and their true lengths."""
    chunk = max(1, min(chunk, p))
    for s in range(0, p, chunk):
        idx = np.arange(s, s + chunk) % p
        yield jnp.asarray(idx), min(chunk, p - s)


@functools.lru_cache(maxsize=256)
def _fd_kernel(model: MLP, step: float):
    def one(params, x, y, i):
        flat, unravel = ravel_pytree(params)
        hit = jnp.arange(flat.shape[0]) == i          # theta +- h e_i, built by a select
        j_plus = cost(model, unravel(jnp.where(hit, flat + step, flat)), x, y)    # forward pass 1
        j_minus = cost(model, unravel(jnp.where(hit, flat - step, flat)), x, y)   # forward pass 2
        return (j_plus - j_minus) / (2 * step)
    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


def finite_difference_gradient(model: MLP, params, x, y, *, step: float = 1e-5,
                               chunk: int = 64) -> GradientResult:
    r"""Central differences, two forward passes per parameter::

        dJ/dtheta_p ~ (J(theta + h e_p) - J(theta - h e_p)) / (2 h),   h = step

    Truncation error O(h^2), rounding O(eps/h): in float64, with parameters
    of order 1, step=1e-5 gives about 1e-10 relative. ``chunk`` parameters are evaluated per vmapped call.

    ``ops`` counts, per parameter, two forward passes up to J (counted on
    their jaxpr) plus 4 scalar ops: the two perturbations, the difference and
    the division. Building the perturbed copies of theta is bookkeeping and
    is not counted (it is done with a select over theta, which XLA runs
    faster than a batched scatter).
    """
    check_data(model, params, x, y, "finite_difference_gradient")
    if not step > 0:
        raise ValueError(f"finite_difference_gradient: step must be > 0, got {step}")
    flat, unravel = ravel_pytree(params)
    p = flat.shape[0]
    kernel = _fd_kernel(model, float(step))
    out = [kernel(params, x, y, idx)[:m] for idx, m in _chunks(p, chunk)]
    grads = unravel(jnp.concatenate(out))
    forward = _count_cached("cost", model, int(np.shape(x)[0]), dtype_name(params))
    ops = OpCount()
    for _, m in _chunks(p, chunk):      # counted as it goes: per parameter 2 passes + 4 ops
        ops = ops + m * (2 * forward + OpCount(mul=1, add=3))
    return GradientResult(grads, ops, 2 * p, "finite_differences")


@functools.lru_cache(maxsize=256)
def _fm_kernel(model: MLP):
    def one(params, x, y, i):
        flat, unravel = ravel_pytree(params)
        tangent = unravel(jax.nn.one_hot(i, flat.shape[0], dtype=flat.dtype))   # seed e_i
        return jax.jvp(lambda q: cost(model, q, x, y), (params,), (tangent,))[1]
    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


def forward_mode_gradient(model: MLP, params, x, y, *, chunk: int = 64) -> GradientResult:
    r"""Forward mode: one JVP per parameter, seeded with the basis vector e_p::

        dJ/dtheta_p = J'(theta) e_p     (jax.jvp: the forward pass and its tangent)

    ``ops`` is P times the count of one JVP's jaxpr (the tangent of J only).
    The seed is a dense array, as ``jax.jvp`` sees it, so each JVP costs the
    same whatever p is: about three forward passes (P_k = X_k W_k, and the
    tangent X_k dW_k + dX_k W_k). Building the seed is bookkeeping and is not
    counted.
    """
    check_data(model, params, x, y, "forward_mode_gradient")
    flat, unravel = ravel_pytree(params)
    p = flat.shape[0]
    kernel = _fm_kernel(model)
    out = [kernel(params, x, y, idx)[:m] for idx, m in _chunks(p, chunk)]
    grads = unravel(jnp.concatenate(out))
    ops = p * _count_cached("jvp", model, int(np.shape(x)[0]), dtype_name(params))
    return GradientResult(grads, ops, p, "forward_mode")


# ----------------------------------------------------------------------------- closed forms

def _sums(model: MLP, n: int):
    """The sums every closed form is written in (docs/complexity.md)."""
    w, L, b = model.widths, model.depth, int(model.bias)
    I = [w[k] for k in range(L)]
    O = [w[k + 1] for k in range(L)]
    W = sum(i * o for i, o in zip(I, O))
    acts = [model.act(k) for k in range(L)]

    def per_elem(kind):                          # N * sum_k a_k c(kind) O_k, as an OpCount
        tot = OpCount()
        for k in range(L):
            if acts[k] is not None:
                tot = tot + (n * O[k]) * OpCount(*ACTIVATION_COSTS[acts[k]][kind])
        return tot
    return w, L, b, I, O, W, per_elem


def forward_ops(model: MLP, n: int = 1, *, loss: bool = True) -> OpCount:
    r"""One forward pass up to J for a batch of n::

        mul = N W + N n_L + 1                 W = sum_k n_k n_{k+1}
        add = N sum_k (n_k - 1 + b) n_{k+1} + 2 N n_L - 1
        other = N sum_k a_k c_f n_{k+1}       (c_f: 1 sigmoid/tanh, 4 relu)

    ``loss=False``: up to Y only (without the ``N n_L + 1`` mul and
    ``2 N n_L - 1`` add of the MSE), the part every other method repeats.
    """
    w, L, b, I, O, W, act = _sums(model, n)
    out = OpCount(mul=n * W, add=n * sum((i - 1 + b) * o for i, o in zip(I, O))) + act("forward")
    if loss:
        out = out + OpCount(mul=n * w[-1] + 1, add=2 * n * w[-1] - 1)
    return out


def backprop_ops(model: MLP, n: int = 1) -> OpCount:
    r"""jp.value_and_grad's gradient: forward, loss backward, reverse sweep::

        forward (no loss tail)  + N n_L add (r = Y - T) + N n_L + 2 mul (dY = (2/N) r)
        per activation element  (2 mul + 1 add) sigmoid/tanh, 1 other relu (where on the cached mask)
        per dense layer k       dW: N I O mul, (N-1) I O add;  db: b (N-1) O add
                                dX (k >= 1 only): N I O mul, N I (O-1) add

    Leading order 6 N W - 2 N n_0 n_1: linear in the number of weights.
    """
    w, L, b, I, O, W, act = _sums(model, n)
    nl = w[-1]
    loss = OpCount(mul=n * nl + 2, add=n * nl)
    sweep = OpCount()
    for k in range(L):
        sweep = sweep + OpCount(mul=n * I[k] * O[k], add=(n - 1) * I[k] * O[k] + b * (n - 1) * O[k])
        if k >= 1:
            sweep = sweep + OpCount(mul=n * I[k] * O[k], add=n * I[k] * (O[k] - 1))
    return forward_ops(model, n, loss=False) + loss + act("backward") + sweep


def finite_difference_ops(model: MLP, n: int = 1) -> OpCount:
    """P (2 forward_ops + 4): two forward passes and 4 scalar ops per parameter."""
    return model.n_params * (2 * forward_ops(model, n) + OpCount(mul=1, add=3))


def jvp_ops(model: MLP, n: int = 1) -> OpCount:
    r"""One JVP of J (its tangent only)::

        primal forward (no loss tail)
        + per dense layer k: X dW: N I O mul, N (I-1) O add; tangent bias: b N O add
                   k >= 1:   dX W: N I O mul, N (I-1) O add; their sum: N O add
        + per activation element: (2 mul + 1 add) sigmoid, (2 mul + 2 add) tanh, 1 other relu
        + loss: r = Y - T (N n_L add); dJ = sum(dY r + r dY)/N: 2 N n_L mul, 2 N n_L - 1 add, 1 mul
    """
    w, L, b, I, O, W, act = _sums(model, n)
    nl = w[-1]
    tan = OpCount()
    for k in range(L):
        tan = tan + OpCount(mul=n * I[k] * O[k], add=n * (I[k] - 1) * O[k] + b * n * O[k])
        if k >= 1:
            tan = tan + OpCount(mul=n * I[k] * O[k], add=n * (I[k] - 1) * O[k] + n * O[k])
    loss = OpCount(mul=2 * n * nl + 1, add=3 * n * nl - 1)
    return forward_ops(model, n, loss=False) + tan + act("tangent") + loss


def forward_mode_ops(model: MLP, n: int = 1) -> OpCount:
    """P jvp_ops: one JVP per parameter."""
    return model.n_params * jvp_ops(model, n)


def forward_passes(model: MLP, ops: OpCount, n: int = 1) -> float:
    """``ops`` in units of one forward pass (forward_ops)."""
    return ops.total / forward_ops(model, n).total


__all__ = ["OpCount", "count_ops", "MLP", "mlp", "ACTIVATION_COSTS", "check_data", "abstract_inputs",
           "dtype_name", "cost", "GradientResult",
           "backprop_gradient", "finite_difference_gradient", "forward_mode_gradient",
           "forward_ops", "backprop_ops", "finite_difference_ops", "jvp_ops", "forward_mode_ops",
           "forward_passes"]
