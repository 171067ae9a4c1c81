r"""``tied(layer, source, target)``: one weight used in two places of a network."""
from __future__ import annotations

from typing import Sequence

from jaxprop.core import Layer, call_forward


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    """``tree`` with the node at ``path`` replaced by ``value`` (tuples, lists
    and dicts rebuilt along the path; nothing modified in place)."""
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, k: _set(tree[k], rest, value)}
    if isinstance(tree, (tuple, list)):
        items = list(tree)
        items[k] = _set(items[k], rest, value)
        return type(tree)(items)
    raise TypeError(f"tied: cannot index a {type(tree).__name__} with {k!r}")


def tied(layer: Layer, source: Sequence, target: Sequence, *, transpose: bool = False) -> Layer:
    r"""``layer`` with the parameter at ``target`` tied to the one at ``source``.

    ``source`` and ``target`` are paths into ``layer``'s params (keys and
    indices, e.g. ``(0, "w")`` for the first layer's ``"w"`` of a
    ``serial``). The tied layer's params are ``layer``'s with the ``target``
    leaf replaced by ``()``; forward fills it in from ``source``::

        W_target = W_source          (W_source^T when transpose=True)
        y        = layer(params with W_target filled in, x)

    W_source is used twice (fan-out), so its gradient is the sum of both
    uses, the chain rule's sum over paths::

        dW_source = dW_source|use 1 + dW_target          (+ dW_target^T when transpose=True)

    where both terms come from ``layer.backward``. Example: a language
    model's head shares the token embedding, logits = h E^T + b::

        net = serial(embedding(V, D), ..., dense(V))
        tied(net, source=(0, "w"), target=(k, "w"), transpose=True)     # k: the head's index

    Args:
      layer: the network (any layer).
      source: path of the weight that is kept (and trained).
      target: path of the weight that is replaced by it; it must have the
        shape of the source (of its transpose with ``transpose=True``).
      transpose: use the source's transpose (a 2-D weight).

    The context (``key=``, ``state=``, ...) goes to ``layer`` unchanged.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"tied: expected a jaxprop Layer, got {type(layer).__name__}")
    source, target = tuple(source), tuple(target)
    if not source or not target or source == target:
        raise ValueError(f"tied: source and target must be two different non-empty paths, got {source} and {target}")
    name = f"tied({layer.name}, {source} -> {target}{', transposed' if transpose else ''})"

    def shared(w):
        return w.T if transpose else w

    def init(key, in_shape):
        out_shape, params = layer.init(key, in_shape)
        try:
            w, old = _get(params, source), _get(params, target)
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{name}: no parameter at path {e} of {layer.name}'s params") from None
        if shared(w).shape != old.shape or w.dtype != old.dtype:
            raise ValueError(f"{name}: the source {source} has shape {w.shape}, dtype {w.dtype}"
                             f"{' (transposed: ' + str(shared(w).shape) + ')' if transpose else ''}; "
                             f"the target {target} needs {old.shape}, {old.dtype}")
        return out_shape, _set(params, target, ())

    def forward(params, x, **ctx):
        full = _set(params, target, shared(_get(params, source)))     # W_target = W_source (^T)
        return call_forward(layer, full, x, **ctx)

    def backward(cache, dy):
        grads, dx = layer.backward(cache, dy)
        d_target = _get(grads, target)
        grads = _set(grads, target, ())
        # forward was: W_target = W_source (^T): both uses of W_source sum
        grads = _set(grads, source, _get(grads, source) + shared(d_target))
        return grads, dx

    return Layer(init, forward, backward, name=name, init_state=layer.init_state,
                 update_state=layer.update_state, stochastic=layer.stochastic)
