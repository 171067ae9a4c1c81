"""Verification: hand-written gradients against ``jax.grad`` and finite differences.

This module (with the custom_vjp bridge) is the only place where jaxprop
calls autodiff; it is the reference, never the gradient path. The hand side
of :func:`check_gradients` *is* the training sweep,
:func:`jaxprop.grad.forward_backward`, so what is checked is what trains.

* Primary reference: ``jax.grad`` / ``jax.vjp`` of the same forward, in the
  input's dtype (exact up to rounding).
* Secondary: central finite differences in float64 along one random
  direction per parameter (``(J(p + h v) - J(p - h v)) / 2h`` against
  ``<grad, v>``). It catches a wrong *forward* too, which autodiff would copy.

Relative error of a leaf: ``max|hand - ref| / max(max|ref|, 1e-3 * global max|ref|)``.
Tolerances depend on dtype (``TOLERANCES``). For an input that is not
floating point (token ids) the backward returns ``dx = None`` and only the
parameters are compared. Any forward context (``key=``, ``train=``,
``state=``, ``mask=``, ...) passes through ``**ctx`` to the layers.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Layer, Loss, call_forward, call_loss, check_dx, check_grads, is_floating
from jaxprop.grad import forward_backward

TOLERANCES = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
FD_TOLERANCE = 1e-6   # float64 central differences; max(FD_TOLERANCE, tol) for lower precision
# check_layer's default cotangent is drawn from fold_in(key(seed), _COTANGENT_SALT): a key no user
# picks for x (normal(key(seed + 1)) was bit-equal to an x drawn with key(1), README's own pattern,
# so a backward that used x in place of dy passed).
_COTANGENT_SALT = 0x6479   # "dy"


def tolerance(dtype) -> float:
    return TOLERANCES.get(jnp.dtype(dtype).name, 1e-4)


@dataclasses.dataclass
class GradientRow:
    name: str
    shape: tuple
    max_abs_err: float
    rel_err: float
    tol: float
    ratio: float            # <hand, ref> / <ref, ref>: 1 when right, -1 wrong sign, 2 extra factor
    fd_rel_err: Optional[float] = None
    fd_tol: float = FD_TOLERANCE

    @property
    def ok(self) -> bool:
        fd_ok = self.fd_rel_err is None or self.fd_rel_err <= self.fd_tol
        return bool(self.rel_err <= self.tol and fd_ok)


@dataclasses.dataclass
class GradientReport:
    """Per-parameter comparison. ``ok`` is the verdict; ``print(report)`` the table."""

    title: str
    dtype: str
    rows: list
    value_rel_err: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def worst_rel_err(self) -> float:
        return max((r.rel_err for r in self.rows), default=0.0)

    def __bool__(self):
        return self.ok

    def explain(self) -> str:
        lines = []
        for r in self.rows:
            if r.ok:
                continue
            msg = f"{r.name}: "
            if r.rel_err > r.tol:
                msg += (f"hand-written gradient differs from jax.grad (rel err {r.rel_err:.2e} > {r.tol:.0e}); "
                        f"<hand,ref>/<ref,ref> = {r.ratio:.4g}")
                if abs(r.ratio + 1) < 1e-2:
                    msg += " -> looks like a wrong sign"
                elif abs(r.ratio - round(r.ratio)) < 1e-2 and round(r.ratio) not in (0, 1):
                    msg += f" -> looks like an extra factor {round(r.ratio)}"
                elif r.ratio != 0 and abs(1 / r.ratio - round(1 / r.ratio)) < 1e-2 and round(1 / r.ratio) > 1:
                    msg += f" -> looks like a missing factor {round(1 / r.ratio)}"
                msg += ". "
            if r.fd_rel_err is not None and r.fd_rel_err > r.fd_tol:
                msg += (f"finite differences disagree with the hand gradient (rel err {r.fd_rel_err:.2e}): "
                        "if jax.grad agrees with the hand gradient, the forward pass itself is suspect "
                        "(or the point sits on a kink, e.g. ReLU at 0).")
            lines.append(msg)
        return "\n".join(lines) if lines else "all gradients agree"

    def __str__(self):
        head = f"{self.title}  [{self.dtype}]  -> {'OK' if self.ok else 'FAILED'}"
        cols = f"{'parameter':<40} {'shape':<16} {'max abs err':>12} {'rel err':>10} {'tol':>7} {'fd rel err':>11}"
        out = [head, cols, "-" * len(cols)]
        for r in self.rows:
            fd = "-" if r.fd_rel_err is None else f"{r.fd_rel_err:.2e}"
            out.append(f"{r.name:<40} {str(r.shape):<16} {r.max_abs_err:>12.3e} {r.rel_err:>10.2e} "
                       f"{r.tol:>7.0e} {fd:>11}{'' if r.ok else '  <-- FAIL'}")
        if not self.ok:
            out.append(self.explain())
        return "\n".join(out)


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if is_floating(a) else a, tree)


def host_normal(key, shape, dtype):
    """Standard normal draws of ``shape`` in ``dtype``, made on the host: NumPy's
    generator seeded by the bits of the JAX ``key``. Deterministic in the key,
    like ``jax.random.normal``, but with no XLA program per shape (the checks
    draw inputs and cotangents of many shapes; each eager ``jax.random`` call
    of a new shape compiles one, the slowest part of a small check)."""
    return jnp.asarray(host_rng(key).standard_normal(tuple(shape)).astype(jnp.dtype(dtype)))


def host_rng(key) -> np.random.Generator:
    """A NumPy generator seeded by the bits of a JAX key (typed or raw uint32)."""
    bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng([int(b) for b in np.asarray(bits).ravel()])


def max_abs(a) -> float:
    """max |a| on the host (0 for an empty array)."""
    a = np.asarray(a)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _compare(title, objective, hand, params, x, *, fd, seed, rtol=None, ref=None):
    """Compare ``hand = (grads, dx)`` with jax.grad of ``objective(params, x)``
    (or with ``ref = (grads, dx)``, that gradient computed by the caller)."""
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params)) if jax.tree_util.tree_leaves(params) \
        else jnp.result_type(x)
    tol = rtol if rtol is not None else tolerance(dtype)
    check_grads(title, hand[0], params)
    check_dx(title, hand[1], x)
    x_is_float = is_floating(x)
    argnums = (0, 1) if x_is_float else (0,)
    if ref is None:
        ref = jax.jit(jax.grad(objective, argnums=argnums))(params, x)   # jitted: one compile, not op by op
    hand_tree = {"params": hand[0], "input": hand[1]} if x_is_float else {"params": hand[0]}
    ref_tree = {"params": ref[0], "input": ref[1]} if x_is_float else {"params": ref[0]}
    h_leaves = jax.tree_util.tree_flatten_with_path(hand_tree)[0]
    r_leaves, r_def = jax.tree_util.tree_flatten_with_path(ref_tree)
    if len(h_leaves) != len(r_leaves) or [p for p, _ in h_leaves] != [p for p, _ in r_leaves]:
        raise ValueError(f"{title}: hand-written grads have structure "
                         f"{jax.tree_util.tree_structure(hand_tree)}, expected {r_def}")
    global_max = max((max_abs(r) for _, r in r_leaves), default=0.0)   # on the host: no XLA program per shape
    fd_errs = _finite_differences(objective, hand_tree, params, x, x_is_float, seed) if fd else None
    rows = []
    for i, ((path, h), (_, r)) in enumerate(zip(h_leaves, r_leaves)):
        if h.shape != r.shape:
            raise ValueError(f"{title}: gradient {jax.tree_util.keystr(path)} has shape {h.shape}, "
                             f"expected {r.shape}")
        h64, r64 = np.asarray(h, np.float64), np.asarray(r, np.float64)
        err = float(np.max(np.abs(h64 - r64))) if h.size else 0.0
        denom = max(float(np.max(np.abs(r64))) if r.size else 0.0, 1e-3 * global_max, 1e-300)
        rr = float(np.vdot(r64, r64))
        ratio = float(np.vdot(h64, r64)) / rr if rr > 0 else 1.0
        rows.append(GradientRow(jax.tree_util.keystr(path), tuple(h.shape), err, err / denom, tol, ratio,
                                None if fd_errs is None else fd_errs[i], max(FD_TOLERANCE, tol)))
    return GradientReport(title, jnp.dtype(dtype).name, rows)


def _finite_differences(objective, hand_tree, params, x, x_is_float, seed):
    """Float64 central differences along one random direction per leaf."""
    with jax.enable_x64(True):
        p64, x64 = _to64(params), _to64(x)
        tree64 = {"params": p64, "input": x64} if x_is_float else {"params": p64}
        leaves, treedef = jax.tree_util.tree_flatten(tree64)
        hand_leaves = jax.tree_util.tree_leaves(hand_tree)

        @jax.jit
        def obj(ls):
            t = jax.tree_util.tree_unflatten(treedef, ls)
            return objective(t["params"], t["input"] if x_is_float else x64)

        rng = np.random.default_rng(seed)
        errs = []
        for i, leaf in enumerate(leaves):
            if leaf.size == 0:
                errs.append(0.0)
                continue
            v = rng.standard_normal(leaf.shape)
            h = 1e-6 * max(1.0, max_abs(leaf))
            plus = list(leaves); plus[i] = np.asarray(leaf) + h * v
            minus = list(leaves); minus[i] = np.asarray(leaf) - h * v
            fd = (float(obj(plus)) - float(obj(minus))) / (2 * h)
            an = float(np.vdot(np.asarray(hand_leaves[i], np.float64), v))
            # typical size of <g, v> for v ~ N(0, I) is ||g||: guards against cancellation
            scale = max(abs(fd), abs(an), float(np.linalg.norm(np.asarray(hand_leaves[i], np.float64))), 1e-300)
            errs.append(abs(fd - an) / scale)
        return errs


def check_gradients(net: Layer, loss: Loss, params, x, y, *, fd: bool = True,
                    rtol: Optional[float] = None, jit: bool = False, seed: int = 0, where=None,
                    **ctx) -> GradientReport:
    """Compare ``jp.value_and_grad(net, loss)`` with ``jax.grad`` and finite differences.

    The hand-written side is :func:`jaxprop.grad.forward_backward`, the sweep
    that ``value_and_grad``, mixed precision and the train step run.
    Returns a :class:`GradientReport`: a row per parameter leaf (and one for
    the input ``x`` when it is floating point), ``report.ok`` the verdict.
    ``fd=False`` skips finite differences (they cost two forward passes per
    leaf, in float64). ``jit=True`` runs the hand-written path under jit.
    ``where=`` goes to the loss; ``**ctx`` (``key=``, ``train=``, ``state=``,
    ...) is the forward context.
    """
    def hand_fn(p, xx):
        sweep = forward_backward(net, loss, p, xx, y, where=where, **ctx)
        return sweep.grads, sweep.dx

    def objective(p, xx):
        yy = _to64(y) if is_floating(xx) and jnp.result_type(xx) == jnp.float64 else y
        pred, _ = call_forward(net, p, xx, **ctx)
        yy = yy.astype(pred.dtype) if is_floating(yy) else yy
        return call_loss(loss, pred, yy, where=where)[0]

    hand = (jax.jit(hand_fn) if jit else hand_fn)(params, x)
    return _compare(f"check_gradients: {net.name} + {loss.name}", objective, hand, params, x,
                    fd=fd, seed=seed, rtol=rtol)


def default_cotangent(shape, dtype, seed: int = 0):
    """The random normal cotangent ``check_layer`` uses when ``dy`` is not given:
    drawn (:func:`host_normal`) from ``fold_in(key(seed), 0x6479)``, a key no
    user would pick for x."""
    return host_normal(jax.random.fold_in(jax.random.key(seed), _COTANGENT_SALT), shape, dtype)


def check_layer(layer: Layer, params, x, *, dy=None, fd: bool = True, rtol: Optional[float] = None,
                jit: bool = False, seed: int = 0, **ctx) -> GradientReport:
    """Compare ``layer.backward(cache, dy)`` with ``jax.vjp`` of ``layer.forward``.

    ``dy`` defaults to a random normal cotangent (never all ones: a uniform
    cotangent hides bugs, e.g. in batch norm), drawn from a key folded with a
    constant so that it never equals an ``x`` drawn with ``key(seed + 1)``.
    The scalar checked is ``<dy, forward(params, x)>``, whose gradient is
    exactly the VJP. ``**ctx`` (``key=``, ``train=``, ``state=``, ...) is the
    forward context. A non-float ``x`` (token ids) expects ``dx = None``.
    """
    if dy is None:
        y = jax.eval_shape(lambda p, xx: call_forward(layer, p, xx, **ctx)[0], params, x)
        dy = default_cotangent(y.shape, y.dtype, seed)

    def hand_fn(p, xx, d):
        _, cache = call_forward(layer, p, xx, **ctx)
        return layer.backward(cache, d)

    hand = (jax.jit(hand_fn) if jit else hand_fn)(params, x, dy)
    return layer_report(layer, params, x, dy, hand, fd=fd, rtol=rtol, seed=seed, **ctx)


def layer_report(layer: Layer, params, x, dy, hand, *, ref=None, fd: bool = True, rtol: Optional[float] = None,
                 seed: int = 0, **ctx) -> GradientReport:
    """:func:`check_layer`'s comparison of ``hand = layer.backward(cache, dy)``
    (a ``(grads, dx)`` the caller computed, e.g. with its own compiled
    forward and backward) with ``ref``, the VJP of the forward at dy (default:
    ``jax.grad`` of ``<dy, forward(params, x)>``), and finite differences."""
    def objective(p, xx):
        out, _ = call_forward(layer, p, xx, **ctx)
        return jnp.vdot(jnp.asarray(dy, out.dtype), out)

    return _compare(f"check_layer: {layer.name}", objective, hand, params, x, fd=fd, seed=seed, rtol=rtol,
                    ref=ref)
