"""Validate a layer's params against the layer, at trace time (free under ``jit``).

Params from another net are the classic silent failure: ``dense(3, bias=False)``
given ``dense(5)``'s weights returns 5 outputs, a ``bias=False`` dict fed to a
``bias=True`` layer dies with ``KeyError: 'b'``, another width fails inside a
NumPy reshape that names no layer. Every parameterized layer calls
:func:`check_params` first thing in ``forward``, with the shapes its
hyperparameters imply::

    dense(O):                 {"w": ("I", O), "b": (O,)}
    conv1d(F, K, groups=G):   {"w": (K, "C/G", F), "b": (F,)}
    batch/layer/group norm:   {"scale": ("C",), "offset": ("C",)}

A string entry is a size the hyperparameters do not fix (it comes from the
input): it matches any size, but the same string must get the same size in
every leaf. The sizes it binds are returned, so the layer then checks its
input against them with the usual message ("expected input with I features
on the last axis"). All leaves must be floating point and share one dtype;
the layer checks the input's dtype against it.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

# why a "b" is missing or unexpected (dense, conv): keyed by the layer's bias= setting
BIAS_NOTES = {True: {"b": "this layer has bias=True; were the params made with bias=False?"},
              False: {"b": "this layer has bias=False; were the params made with bias=True?"}}


def _fmt(spec):
    return "(" + ", ".join(str(d) for d in spec) + ("," if len(spec) == 1 else "") + ")"


def check_params(name: str, params, spec: Mapping, *, notes: Mapping | None = None):
    """Check ``params`` against ``spec`` = {key: shape}; return ``(sizes, dtype)``.

    Args:
      name: the layer's name, first word of every message.
      params: what ``forward`` received.
      spec: for each expected key, a tuple of ints (fixed by the layer's
        hyperparameters) and strings (named sizes taken from the params,
        equal wherever the same name appears).
      notes: optional ``{key: text}`` appended when that key is missing or
        unexpected (e.g. ``"b"``: which ``bias=`` setting the params suggest).

    Returns:
      ``sizes``: ``{size name: int}`` bound from the params; ``dtype``: their
      common floating dtype.

    Raises:
      ValueError naming the layer, the param path (``params['w']``), the
      expected shape/dtype and the received one.
    """
    notes = dict(notes or {})
    want = sorted(spec)
    if not isinstance(params, Mapping):
        raise ValueError(f"{name}: params must be a dict with keys {want}, got {type(params).__name__} "
                         f"{_describe(params)} (params of another layer, or of a whole net?)")
    got = sorted(params)
    missing = [k for k in want if k not in params]
    extra = [k for k in got if k not in spec]
    if missing or extra:
        parts = [f"params[{k!r}] is missing (expected shape {_fmt(spec[k])})" for k in missing]
        parts += [f"unexpected params[{k!r}]" for k in extra]
        note = " ".join(notes[k] for k in missing + extra if k in notes)
        raise ValueError(f"{name}: {'; '.join(parts)}: expected keys {want}, got {got}" + (f" ({note})" if note else ""))

    sizes, where, dtype, first = {}, {}, None, None
    for k in want:                                   # sorted: the same first leaf every time
        a = params[k]
        path = f"params[{k!r}]"
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{name}: {path} must be an array of shape {_fmt(spec[k])}, got {type(a).__name__}")
        shape, dt = tuple(np.shape(a)), jnp.dtype(a.dtype)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{name}: {path} must be floating point, got dtype {dt}")
        if dtype is None:
            dtype, first = dt, path
        elif dt != dtype:
            raise ValueError(f"{name}: {path} expected dtype {dtype} (that of {first}), got {dt}")
        expected = spec[k]
        ok = len(shape) == len(expected)
        for d, e in zip(shape, expected) if ok else ():
            if isinstance(e, str):
                if e in sizes and sizes[e] != d:
                    ok = False
            elif d != e:
                ok = False
        if not ok:
            shown = tuple(sizes.get(e, e) if isinstance(e, str) else e for e in expected)
            bound = [f"{e} = {sizes[e]} from {where[e]}" for e in dict.fromkeys(expected)
                     if isinstance(e, str) and e in sizes]
            raise ValueError(f"{name}: {path} expected shape {_fmt(shown)}"
                             + (f" ({', '.join(bound)})" if bound else "")
                             + f", got {shape} (params made for a layer with other hyperparameters?)")
        for d, e in zip(shape, expected):
            if isinstance(e, str) and e not in sizes:
                sizes[e], where[e] = d, path
    return sizes, dtype


def _describe(params):
    try:
        return f"of length {len(params)}"
    except TypeError:
        return ""


def check_no_params(name: str, params):
    """A parameterless layer accepts ``()`` (or any empty container, or None)."""
    if params is None:
        return
    if isinstance(params, (tuple, list, dict)) and len(params) == 0:
        return
    raise ValueError(f"{name}: this layer has no parameters: expected params (), got {type(params).__name__} "
                     f"{_describe(params)} (params of another layer?)")
