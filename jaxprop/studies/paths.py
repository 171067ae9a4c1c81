r"""The gradient by explicit path enumeration: the chain rule expanded, term by term.

For the MLP of :mod:`jaxprop.studies.complexity` (``P_k = X_k W_k + b_k``,
``X_{k+1} = f(P_k)``, ``Y = X_L``, ``J = (1/N) sum_n sum_o (Y_no - T_no)^2``),
a weight ``W_k[i, j]`` reaches J only through ``P_k[j]``, then through one
neuron of every later layer, then one output. The chain rule over all those
paths is::

    dJ/dW_k[i,j] = sum_n  sum_{m_{k+1}, ..., m_{L-1}}
                   X_k[n,i] . f'(P_k[n,j]) . W_{k+1}[j, m_{k+1}] . f'(P_{k+1}[n, m_{k+1}])
                   . ... . W_{L-1}[m_{L-2}, m_{L-1}] . f'(P_{L-1}[n, m_{L-1}]) . dJ/dY[n, m_{L-1}]

(``m_l``: the neuron of layer l's output the path goes through; a bias
``b_k[j]`` is the same with ``X_k[n,i]`` replaced by ``dP/db = 1``). Each
parameter of layer k has ``paths_k = n_{k+2} n_{k+3} ... n_L`` paths, and the
first layer's weights together have ``n_0 n_1 ... n_L`` -- every
input-to-output path. :func:`path_gradient` evaluates every term of this
sum, a full product for each, and sums them; nothing is shared between
parameters or between paths. That is the method backprop replaces: the
suffix of each product from ``P_{k+1}[m]`` on is ``dJ/dP_{k+1}[m]``, which
the reverse sweep computes once (:func:`upstream_reuse` counts how often the
expansion recomputes it).

Representation: plain numpy float64 over the whole batch; the local
derivatives (``X_k``, ``f'(P_k)``, ``dJ/dY``) come from one forward pass of
jaxprop's layers, and the paths of a parameter are enumerated in blocks
(vectorised over paths and over the rows ``i``, never sharing a product).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.studies.complexity import (ACTIVATION_COSTS, MLP, GradientResult, OpCount, abstract_inputs,
                                        backprop_ops, check_data, count_ops, dtype_name, forward_ops)

#: path_gradient refuses more path products than this (paths x examples) by default.
DEFAULT_MAX_PATHS = 10 ** 8
_BLOCK = 1 << 15          # elements per vectorised block


class PathLimitError(ValueError):
    """The network has more paths than the caller allowed (``max_paths``)."""


# ----------------------------------------------------------------------------- counting paths

def input_output_paths(widths) -> int:
    """Paths from an input to an output of a fully connected net: n_0 n_1 ... n_L."""
    return math.prod(int(n) for n in widths)


def paths_per_parameter(model: MLP) -> tuple:
    """``paths_k = n_{k+2} ... n_L``: paths from one parameter of layer k to J."""
    w = model.widths
    return tuple(math.prod(w[k + 2:]) for k in range(model.depth))


def total_paths(model: MLP) -> int:
    """Parameter-to-cost paths of one example, all parameters: sum_k P_k paths_k."""
    w = model.widths
    return sum((w[k] + model.bias) * w[k + 1] * pk
               for k, pk in enumerate(paths_per_parameter(model)))


def factors_per_path(model: MLP) -> tuple:
    """Factors in one path product from layer k: ``X_k[i]``, ``f'(P_k)``, then
    ``W_l`` and ``f'(P_l)`` for each later layer, then ``dJ/dY``."""
    L = model.depth
    a = [model.act(k) is not None for k in range(L)]
    return tuple(1 + a[k] + sum(1 + a[l] for l in range(k + 1, L)) + 1 for k in range(L))


def path_ops(model: MLP, n: int = 1) -> OpCount:
    r"""The closed form of :func:`path_gradient`'s count, batch of n::

        setup: forward (no loss) + f'(P_k) for every activated element
               + dJ/dY = (2/N)(Y - T): N n_L add, N n_L mul
        mul = sum_k P_k N paths_k (F_k - 1)        P_k = (n_k + b) n_{k+1} parameters
        add = sum_k P_k (N paths_k - 1)            F_k = factors_per_path(model)[k]
    """
    w, L, b = model.widths, model.depth, int(model.bias)
    setup = forward_ops(model, n, loss=False) + OpCount(mul=n * w[-1], add=n * w[-1])
    for k in range(L):
        if model.act(k) is not None:
            setup = setup + (n * w[k + 1]) * OpCount(*ACTIVATION_COSTS[model.act(k)]["deriv"])
    mul = add = 0
    for k, (pk, fk) in enumerate(zip(paths_per_parameter(model), factors_per_path(model))):
        params_k = (w[k] + b) * w[k + 1]
        mul += params_k * n * pk * (fk - 1)
        add += params_k * (n * pk - 1)
    return setup + OpCount(mul=mul, add=add)


def upstream_reuse(model: MLP) -> tuple:
    r"""How many times the path expansion recomputes ``dJ/dP_m[s]``, per layer m.

    ``dJ/dP_m[s]`` is the sum over the downstream paths from neuron s of
    layer m's output. The expansion evaluates it again for every pair
    (parameter, path from that parameter to ``P_m[s]``)::

        R_m = (n_m + b)  +  sum_{k<m} (n_k + b) n_{k+1} . n_{k+2} ... n_m

    (the first term: the parameters feeding s directly). Backprop computes it
    once. Per example; the same for every neuron s of layer m.
    """
    w, b = model.widths, int(model.bias)
    out = []
    for m in range(model.depth):
        r = w[m] + b
        for k in range(m):
            r += (w[k] + b) * w[k + 1] * math.prod(w[k + 2:m + 1])
        out.append(r)
    return tuple(out)


# ----------------------------------------------------------------------------- local derivatives

def _deriv(act: str, p, y):
    """f'(P) from the forward values, as cheaply as jaxprop's backward does."""
    if act == "sigmoid":
        return y * (1 - y)
    if act == "tanh":
        return 1 - y * y
    if act == "relu":
        return (p > 0).astype(p.dtype)
    raise ValueError(act)


def _local_derivatives_fn(model: MLP):
    layers = model.layers

    def fn(params, x, y):
        xs, ds, li = [x], [], 0
        h = x
        for k in range(model.depth):
            p, _ = layers[li].forward(params[li], h)
            li += 1
            if model.act(k) is not None:
                h, _ = layers[li].forward(params[li], p)
                ds.append(_deriv(model.act(k), p, h))
                li += 1
            else:
                h = p
                ds.append(None)
            xs.append(h)
        g = (2.0 / x.shape[0]) * (h - y)            # dJ/dY = (2/N)(Y - T)
        return tuple(xs[:-1]), tuple(ds), g
    return fn


@functools.lru_cache(maxsize=256)
def _local_kernel(model: MLP):
    return jax.jit(_local_derivatives_fn(model))


@functools.lru_cache(maxsize=256)
def setup_ops(model: MLP, n: int = 1, dtype: str = "float64") -> OpCount:
    """Counted operations of the forward pass that yields the local derivatives
    (:func:`local_derivatives`), traced on shapes; cached."""
    return count_ops(_local_derivatives_fn(model), *abstract_inputs(model, n, dtype))


def local_derivatives(model: MLP, params, x, y):
    """The factors every path product is made of, from one forward pass.

    Returns numpy float64 ``(xs, ds, ws, bs, g)``: ``xs[k] = X_k`` (N, n_k);
    ``ds[k] = f'(P_k)`` (N, n_{k+1}) or ``None`` (no activation);
    ``ws[k] = W_k``; ``bs[k] = b_k`` or ``None``; ``g = dJ/dY`` (N, n_L).
    """
    xs, ds, g = _local_kernel(model)(params, x, y)
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    ws = [np.asarray(params[model.dense_index(k)]["w"], np.float64) for k in range(model.depth)]
    bs = [f64(params[model.dense_index(k)].get("b")) for k in range(model.depth)]
    return [f64(a) for a in xs], [f64(d) for d in ds], ws, bs, f64(g)


# ----------------------------------------------------------------------------- one weight, readable

class Path(NamedTuple):
    """One term of the chain-rule sum for one parameter and one example.

    ``neurons``: the output neuron of layer k, k+1, ..., L-1 the path runs
    through; ``factors``: ``(label, value)`` pairs in chain-rule order
    (dP/dW first, dJ/dY last); ``product``: their product.
    """

    neurons: tuple
    factors: tuple
    product: float


def _name(sym, k, idx, dims):
    """``W1[2,0]``, or ``W1`` when the array has one element (per example)."""
    return f"{sym}{k}" + (f"[{','.join(map(str, idx))}]" if any(d > 1 for d in dims) else "")


def influence_paths(model: MLP, params, x, y, layer: int, i: int, j: int, *, example: int = 0,
                    bias: bool = False) -> list:
    """Every path from the parameter ``W_layer[i, j]`` (or ``b_layer[j]`` with
    ``bias=True``) to J, for one example, with each local derivative named.

    Labels use the design notes' names: ``X_k`` inputs of dense layer k
    (``Y = X_L``), ``P_k`` its pre-activation, ``W_k`` its weights; indices
    are omitted for width-1 layers, so the simplest network reads
    ``dP0/dW0 = X0, dX1/dP0 = f'(P0), dP1/dX1 = W1, dY/dP1 = f'(P1), dJ/dY``.
    The sum over examples of all products is ``dJ/dW_layer[i, j]``.
    """
    check_data(model, params, x, y, "influence_paths")
    w, L = model.widths, model.depth
    if not 0 <= layer < L:
        raise ValueError(f"influence_paths: layer must be in [0, {L}) for the {model} network, got {layer}")
    if bias and not model.bias:
        raise ValueError(f"influence_paths: the {model} network has no biases")
    if not bias and not 0 <= i < w[layer]:
        raise ValueError(f"influence_paths: i must be in [0, {w[layer]}) for W{layer}, got {i}")
    if not 0 <= j < w[layer + 1]:
        raise ValueError(f"influence_paths: j must be in [0, {w[layer + 1]}) for W{layer}, got {j}")
    if not 0 <= example < np.shape(x)[0]:
        raise ValueError(f"influence_paths: example must be in [0, {np.shape(x)[0]}), got {example}")
    xs, ds, ws, _, g = local_derivatives(model, params, x, y)
    n = example
    xname = lambda l, m: "Y" + ("" if w[l] == 1 else f"[{m}]") if l == L else _name("X", l, (m,), (w[l],))
    pname = lambda l, m: _name("P", l, (m,), (w[l + 1],))
    first = ((f"d{pname(layer, j)}/d{_name('b', layer, (j,), (w[layer + 1],))}", 1.0) if bias else
             (f"d{pname(layer, j)}/d{_name('W', layer, (i, j), (w[layer], w[layer + 1]))} = "
              f"{xname(layer, i)}", float(xs[layer][n, i])))
    out = []
    for rest in itertools.product(*[range(w[l + 1]) for l in range(layer + 1, L)]):
        route = (j,) + rest
        facs = [first]
        for l, m in zip(range(layer, L), route):
            if l > layer:
                prev = route[l - layer - 1]
                facs.append((f"d{pname(l, m)}/d{xname(l, prev)} = "
                             f"{_name('W', l, (prev, m), (w[l], w[l + 1]))}", float(ws[l][prev, m])))
            if ds[l] is not None:
                facs.append((f"d{xname(l + 1, m)}/d{pname(l, m)} = f'({pname(l, m)})", float(ds[l][n, m])))
        facs.append((f"dJ/d{xname(L, route[-1])}", float(g[n, route[-1]])))
        prod = 1.0
        for _, v in facs:
            prod *= v
        out.append(Path(route, tuple(facs), prod))
    return out


# ----------------------------------------------------------------------------- every weight

def path_gradient(model: MLP, params, x, y, *, max_paths: int = DEFAULT_MAX_PATHS) -> GradientResult:
    r"""dJ/dtheta by evaluating every term of the chain rule's sum over paths.

    For each parameter of layer k, each of its ``paths_k`` paths and each of
    the N examples, the product of the ``F_k`` local derivatives is formed in
    full (``F_k - 1`` multiplications) and all are summed
    (``N paths_k - 1`` additions). The count is kept as it goes and equals
    :func:`path_ops`; the local derivatives come from one forward pass, whose
    count (jaxpr of the forward) is included.

    Raises :class:`PathLimitError` (a ``ValueError``) when the number of path
    products, N times :func:`total_paths`, exceeds ``max_paths``.

    Returns a :class:`GradientResult`: grads with the pytree of ``params``,
    ``evaluations`` = path products summed.
    """
    check_data(model, params, x, y, "path_gradient")
    n = int(np.shape(x)[0])
    per_example = total_paths(model)
    if n * per_example > max_paths:
        est = path_ops(model, n).total
        raise PathLimitError(
            f"path_gradient: the {model} network has {per_example:,} parameter-to-cost paths per "
            f"example ({input_output_paths(model.widths):,} input-to-output paths), "
            f"{n * per_example:,} path products for a batch of {n}: more than "
            f"max_paths={max_paths:,}. Expanding them costs {est:.3g} scalar operations, against "
            f"{backprop_ops(model, n).total:,} for backprop. Pass a larger max_paths= to run it anyway.")
    xs, ds, ws, bs, g = local_derivatives(model, params, x, y)
    ops = setup_ops(model, n, dtype_name(params))
    mul = add = evaluations = 0
    L, widths = model.depth, model.widths
    grads = []
    for k in range(L):
        down = widths[k + 2:]                    # neurons a path picks after P_k[j]
        n_paths = math.prod(down)
        rows = widths[k] + model.bias            # inputs X_k[:, i], then the constant 1 (bias)
        inputs = np.concatenate([xs[k], np.ones((n, 1))], axis=1) if model.bias else xs[k]
        chunk = max(1, _BLOCK // (rows * n))
        gk = np.zeros((rows, widths[k + 1]))
        for j in range(widths[k + 1]):
            for s in range(0, n_paths, chunk):
                c = min(chunk, n_paths - s)
                route = np.unravel_index(np.arange(s, s + c), down) if down else ()
                # the factors after dP/dW, gathered (looked up, not computed) for c paths
                facs = []
                if ds[k] is not None:
                    facs.append(np.broadcast_to(ds[k][:, j:j + 1], (n, c)))
                prev = np.full(c, j)
                for l, m in zip(range(k + 1, L), route):
                    facs.append(ws[l][prev, m][None, :])
                    if ds[l] is not None:
                        facs.append(ds[l][:, m])
                    prev = m
                facs.append(g[:, prev])
                # one full product per (parameter row i, example, path)
                acc = np.empty((rows, n, c))
                np.multiply(np.broadcast_to(inputs.T[:, :, None], (rows, n, c)), facs[0], out=acc)
                for f in facs[1:]:
                    np.multiply(acc, f, out=acc)
                mul += rows * n * c * len(facs)
                part = acc.reshape(rows, n * c).sum(axis=1)
                add += rows * (n * c - 1)
                gk[:, j] += part
                if s > 0:                        # the first block's sum is the start value
                    add += rows
                evaluations += rows * n * c
        grads.append(gk)
    tree = []
    for k in range(L):
        d = {"w": grads[k][:widths[k]]}
        if model.bias:
            d["b"] = grads[k][widths[k]]
        tree.append(d)
        if model.act(k) is not None:
            tree.append(())
    dt = jnp.result_type(*jax.tree_util.tree_leaves(params))
    tree = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dt), tuple(tree))
    return GradientResult(tree, ops + OpCount(mul=mul, add=add), evaluations, "paths")


__all__ = ["DEFAULT_MAX_PATHS", "PathLimitError", "input_output_paths", "paths_per_parameter",
           "total_paths", "factors_per_path", "path_ops", "upstream_reuse", "local_derivatives", "setup_ops",
           "Path", "influence_paths", "path_gradient"]
