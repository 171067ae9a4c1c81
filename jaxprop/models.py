"""Models built from a one-line spec, as the experiment runner's ``--model`` takes them.

A spec is ``NAME`` or ``NAME:ARGS``; ``NAME`` selects a builder in :data:`MODELS`
and the builder parses ``ARGS`` itself::

    linear                       logistic / linear regression: dense(n_outputs)
    mlp:100-100:relu             dense(100), relu, dense(100), relu, dense(n_outputs)
    mlp:64:tanh:dropout=0.1      options after the activation: dropout=RATE, init=glorot|he|lecun

``build_model(spec, n_outputs)`` returns a :class:`jaxprop.Layer`. The input
shape is not part of the spec: the caller initialises with the data set's
shape, ``net.init(key, (batch,) + x.shape[1:])``.

To add a family (a CNN, say), register a builder
``builder(args: str, n_outputs: int) -> Layer``::

    def cnn(args, n_outputs): ...
    jaxprop.models.MODELS["cnn"] = cnn          # then --model cnn:...

A builder for signals stored as (N, L) adds its own ``jp.reshape`` layer.
"""
from __future__ import annotations

from typing import Callable, Dict

from jaxprop.core import Layer
from jaxprop.combinators import serial
from jaxprop.layers.dense import dense
from jaxprop.layers.dropout import dropout
from jaxprop.layers import activations

ACTIVATIONS: Dict[str, Callable[[], Layer]] = {
    "relu": activations.relu, "tanh": activations.tanh, "sigmoid": activations.sigmoid,
    "gelu": activations.gelu, "silu": activations.silu, "elu": activations.elu,
    "leaky_relu": activations.leaky_relu, "softplus": activations.softplus,
    "identity": activations.identity,
}


def _options(name: str, parts, allowed) -> dict:
    opts = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"model {name}: unknown option {part!r}; options are "
                             + ", ".join(f"{k}=..." for k in allowed))
        opts[key] = value
    return opts


def linear(args: str, n_outputs: int) -> Layer:
    """``linear``: one dense layer, ``y = x W + b`` (logistic regression under a
    softmax cross-entropy loss). Option: ``init=glorot|he|lecun``."""
    opts = _options("linear", [p for p in args.split(":") if p], ("init",))
    return dense(n_outputs, w_init=opts.get("init", "glorot"))


def mlp(args: str, n_outputs: int) -> Layer:
    """``mlp:W1-W2-...:ACT[:dropout=R][:init=I]``: hidden widths W_k, one activation
    after each hidden dense layer (and dropout after it when R > 0), then a
    linear output layer of ``n_outputs``. ``ACT`` defaults to relu."""
    parts = args.split(":") if args else []
    if not parts or not parts[0]:
        raise ValueError("model mlp: give the hidden widths, e.g. 'mlp:100-100:relu'")
    try:
        widths = [int(w) for w in parts[0].split("-")]
    except ValueError:
        raise ValueError(f"model mlp: widths must be integers joined by '-', got {parts[0]!r} "
                         "(e.g. 'mlp:100-100:relu')") from None
    if any(w < 1 for w in widths):
        raise ValueError(f"model mlp: widths must be positive, got {widths}")
    act_name = "relu"
    rest = parts[1:]
    if rest and "=" not in rest[0]:
        act_name, rest = rest[0], rest[1:]
    if act_name not in ACTIVATIONS:
        raise ValueError(f"model mlp: unknown activation {act_name!r}; choose one of {sorted(ACTIVATIONS)}")
    opts = _options("mlp", rest, ("dropout", "init"))
    rate = float(opts.get("dropout", 0.0))
    init = opts.get("init", "glorot")
    layers = []
    for w in widths:
        layers += [dense(w, w_init=init), ACTIVATIONS[act_name]()]
        if rate > 0:
            layers.append(dropout(rate))
    layers.append(dense(n_outputs, w_init=init))
    return serial(*layers)


MODELS: Dict[str, Callable[[str, int], Layer]] = {"linear": linear, "mlp": mlp}


def build_model(spec: str, n_outputs: int) -> Layer:
    """The network named by ``spec`` (see the module docstring) with ``n_outputs`` outputs."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"build_model: spec must be a non-empty string such as 'mlp:100-100:relu', got {spec!r}")
    if not isinstance(n_outputs, int) or n_outputs < 1:
        raise ValueError(f"build_model: n_outputs must be a positive int, got {n_outputs!r}")
    name, _, args = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r} in spec {spec!r}; registered: {sorted(MODELS)}")
    return MODELS[name](args, n_outputs)
