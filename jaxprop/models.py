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


# ------------------------------------------------------------------ convolutional nets (issue #5)
import re as _re  # noqa: E402

from jaxprop.layers import augment as _augment, conv as _conv, norm as _norm  # noqa: E402
from jaxprop.layers import pooling as _pooling, reshape as _reshape  # noqa: E402

_CONV_TOKEN = _re.compile(r"c(\d+)k(\d+)((?:[sdpg]\d+)*)$")
_POOL_TOKEN = _re.compile(r"(mp|ap)(\d+)(?:s(\d+))?$")


def cnn(args: str, n_outputs: int) -> Layer:
    """``cnn:TOKENS[:OPTION=VALUE...]``: a convolutional net, then flatten and ``dense(n_outputs)``.

    TOKENS, joined by ``-``, in order:

    * ``c<F>k<K>[s<S>][d<D>][p<P>][g<G>]``: convolution, F features, kernel K,
      stride S, dilation D, explicit padding P on each side (else ``pad=``), G groups;
      without bias when ``bn`` follows (batch norm cancels it)
    * ``bn``, ``ln``, ``gn<G>``: batch / layer / group norm
    * an activation name (``relu``, ``gelu``, ...)
    * ``mp<K>[s<S>]``, ``ap<K>[s<S>]``: max / average pool (stride defaults to K)
    * ``gap``: global average pool; ``flat``: flatten; ``fc<W>``: hidden dense layer;
      ``drop<R>``: dropout

    Options: ``in=40x1`` the per-example shape the flat input is reshaped to
    (default ``-1x1``, a 1-D signal with one channel; ``8x8x1`` makes 2-D
    convolutions), ``pad=same|valid|circular`` (default same),
    ``shift=N`` random wrap-around shifts of up to N positions in training
    (:func:`jaxprop.layers.augment.random_shift`), ``init=he|glorot|lecun``
    (default he). Examples::

        cnn:c25k5s2p1-relu-c25k3s2p1-relu-c25k3s2p1-relu          # MNIST-1D paper's CNN
        cnn:c64k5-bn-relu-c64k5-bn-relu-gap:pad=circular:shift=4
        cnn:c32k3-relu-mp2-c64k3-relu-gap:in=8x8x1                 # 2-D, digits
    """
    parts = args.split(":") if args else []
    if not parts or not parts[0] or "=" in parts[0]:
        raise ValueError("model cnn: give the layers, e.g. 'cnn:c32k5-bn-relu-c32k5-bn-relu-gap'")
    opts = _options("cnn", parts[1:], ("in", "pad", "shift", "init"))
    try:
        in_shape = tuple(int(d) for d in opts.get("in", "-1x1").split("x"))
    except ValueError:
        raise ValueError(f"model cnn: in= must be dimensions joined by 'x', e.g. 40x1 or 8x8x1; "
                         f"got {opts['in']!r}") from None
    nd = len(in_shape) - 1
    if nd not in (1, 2):
        raise ValueError(f"model cnn: in= must give (length, channels) or (height, width, channels), got {in_shape}")
    pad = opts.get("pad", "same").upper()
    init = opts.get("init", "he")
    make_conv = _conv.conv1d if nd == 1 else _conv.conv2d
    layers = [_reshape.reshape(in_shape)]
    if int(opts.get("shift", 0)) > 0:
        layers.append(_augment.random_shift(int(opts["shift"])))
    tokens = parts[0].split("-")
    for i, tok in enumerate(tokens):
        m = _CONV_TOKEN.match(tok)
        p = _POOL_TOKEN.match(tok)
        if m:
            extra = {k: int(v) for k, v in _re.findall(r"([sdpg])(\d+)", m.group(3))}
            layers.append(make_conv(int(m.group(1)), int(m.group(2)), stride=extra.get("s", 1),
                                    padding=extra["p"] if "p" in extra else pad, dilation=extra.get("d", 1),
                                    groups=extra.get("g", 1), w_init=init,
                                    # batch norm subtracts the batch mean: a bias before it has no effect
                                    bias=tokens[i + 1:i + 2] != ["bn"]))
        elif p:
            pool = _pooling.max_pool if p.group(1) == "mp" else _pooling.avg_pool
            layers.append(pool(int(p.group(2)), int(p.group(3)) if p.group(3) else None))
        elif tok == "bn":
            layers.append(_norm.batch_norm())
        elif tok == "ln":
            layers.append(_norm.layer_norm())
        elif _re.fullmatch(r"gn\d+", tok):
            layers.append(_norm.group_norm(int(tok[2:])))
        elif tok == "gap":
            layers.append(_pooling.global_avg_pool())
        elif tok == "flat":
            layers.append(_reshape.flatten())
        elif _re.fullmatch(r"fc\d+", tok):
            layers.append(dense(int(tok[2:]), w_init=init))
        elif _re.fullmatch(r"drop[0-9.]+", tok):
            layers.append(dropout(float(tok[4:])))
        elif tok in ACTIVATIONS:
            layers.append(ACTIVATIONS[tok]())
        else:
            raise ValueError(f"model cnn: unknown layer token {tok!r}; use c<F>k<K>[s<S>][d<D>][p<P>][g<G>], "
                             f"bn, ln, gn<G>, mp<K>[s<S>], ap<K>[s<S>], gap, flat, fc<W>, drop<R> or one of "
                             f"{sorted(ACTIVATIONS)}")
    layers += [_reshape.flatten(), dense(n_outputs, w_init="glorot")]
    return serial(*layers)


MODELS["cnn"] = cnn
