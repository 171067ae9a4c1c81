"""Models built from a one-line spec, as the experiment runner's ``--model`` takes them.

A spec is ``NAME`` or ``NAME:ARGS``; ``NAME`` selects a builder in :data:`MODELS`
and the builder parses ``ARGS`` itself::

    linear                       logistic / linear regression: dense(n_outputs)
    mlp:100-100:relu             dense(100), relu, dense(100), relu, dense(n_outputs)
    mlp:64:tanh:dropout=0.1      options after the activation: dropout=RATE, init=glorot|he|lecun
    cnn:c32k5-bn-relu-gap        a convolutional net (see :func:`cnn`)
    gru:128                      signals (N, L): reshape to (N, L, 1), gru(128), last state -> dense
    gru:256:emb=64               text (N, T) ids: embedding(V, 64), gru(256) every step -> dense(V)
    lstm:256, rnn:128:relu       the same with lstm / rnn cells; gru:256-256 stacks two
    gru:512:emb=64:drop=0.1      dropout after the embedding and each recurrent layer
    lstm:512:emb=64:fbias=1      forget-gate bias 1 at init (jp.lstm(forget_bias=1))
    gpt:2-64-4:tied              text: a GPT of 2 blocks, width 64, 4 heads (see :func:`gpt`)

``build_model(spec, n_outputs, vocab_size=None, context=None)`` returns a
:class:`jaxprop.Layer`. The input shape is not part of the spec: the caller
initialises with the data set's shape, ``net.init(key, (batch,) + x.shape[1:])``.
A text data set (token ids) passes ``vocab_size`` (V) and ``context`` (T):
with them the recurrent specs are language models and ``gpt`` can be built.

To add a family, register a builder ``builder(args: str, n_outputs: int) -> Layer``
(it may also declare ``vocab_size=None, context=None`` keywords)::

    def mine(args, n_outputs): ...
    jaxprop.runner.models.MODELS["mine"] = mine        # then --model mine:...

A builder for signals stored as (N, L) adds its own ``jp.reshape`` layer.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

from jaxprop.combinators import repeat, serial
from jaxprop.combinators.tied import tied
from jaxprop.core import Layer
from jaxprop.layers import activations, augment, conv, norm, pooling, reshape
from jaxprop.layers.dense import dense
from jaxprop.layers.dropout import dropout
from jaxprop.layers.embedding import embedding
from jaxprop.layers.positional import positional_embedding
from jaxprop.layers.recurrent import gru as gru_layer, lstm as lstm_layer, rnn as rnn_layer
from jaxprop.layers.transformer import transformer_block
from jaxprop.combinators.remat import remat

#: Activation layers by the name a spec uses.
ACTIVATIONS: Dict[str, Callable[[], Layer]] = {
    name: getattr(activations, name)
    for name in ("relu", "tanh", "sigmoid", "gelu", "silu", "elu", "leaky_relu", "softplus", "identity")}


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


_CONV_TOKEN = re.compile(r"c(\d+)k(\d+)((?:[sdpg]\d+)*)$")
_POOL_TOKEN = re.compile(r"(mp|ap)(\d+)(?:s(\d+))?$")


def _cnn_layer(tok: str, next_tok, pad: str, init: str, make_conv) -> Layer:
    """The layer of one ``cnn`` token (``next_tok``: the token after it, or None)."""
    m, p = _CONV_TOKEN.match(tok), _POOL_TOKEN.match(tok)
    if m:
        extra = {k: int(v) for k, v in re.findall(r"([sdpg])(\d+)", m.group(3))}
        return make_conv(int(m.group(1)), int(m.group(2)), stride=extra.get("s", 1),
                         padding=extra["p"] if "p" in extra else pad, dilation=extra.get("d", 1),
                         groups=extra.get("g", 1), w_init=init,
                         bias=next_tok != "bn")      # batch norm subtracts the batch mean: a bias has no effect
    if p:
        pool = pooling.max_pool if p.group(1) == "mp" else pooling.avg_pool
        return pool(int(p.group(2)), int(p.group(3)) if p.group(3) else None)
    if tok == "bn":
        return norm.batch_norm()
    if tok == "ln":
        return norm.layer_norm()
    if re.fullmatch(r"gn\d+", tok):
        return norm.group_norm(int(tok[2:]))
    if tok == "gap":
        return pooling.global_avg_pool()
    if tok == "flat":
        return reshape.flatten()
    if re.fullmatch(r"fc\d+", tok):
        return dense(int(tok[2:]), w_init=init)
    if re.fullmatch(r"drop[0-9.]+", tok):
        return dropout(float(tok[4:]))
    if tok in ACTIVATIONS:
        return ACTIVATIONS[tok]()
    raise ValueError(f"model cnn: unknown layer token {tok!r}; use c<F>k<K>[s<S>][d<D>][p<P>][g<G>], "
                     f"bn, ln, gn<G>, mp<K>[s<S>], ap<K>[s<S>], gap, flat, fc<W>, drop<R> or one of "
                     f"{sorted(ACTIVATIONS)}")


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
    pad, init = opts.get("pad", "same").upper(), opts.get("init", "he")
    make_conv = conv.conv1d if nd == 1 else conv.conv2d
    layers = [reshape.reshape(in_shape)]
    if int(opts.get("shift", 0)) > 0:
        layers.append(augment.random_shift(int(opts["shift"])))
    tokens = parts[0].split("-")
    for i, tok in enumerate(tokens):
        layers.append(_cnn_layer(tok, tokens[i + 1] if i + 1 < len(tokens) else None, pad, init, make_conv))
    layers += [reshape.flatten(), dense(n_outputs, w_init="glorot")]
    return serial(*layers)


# --------------------------------------------------------------------------- sequence models

def _widths(family: str, text: str, example: str):
    try:
        widths = [int(w) for w in text.split("-")]
    except ValueError:
        raise ValueError(f"model {family}: expected integers joined by '-', got {text!r} "
                         f"(e.g. '{example}')") from None
    if any(w < 1 for w in widths):
        raise ValueError(f"model {family}: sizes must be positive, got {widths}")
    return widths


def _recurrent_model(family: str, args: str, n_outputs: int, vocab_size: Optional[int],
                     make_cell: Callable) -> Layer:
    parts = args.split(":") if args else []
    if not parts or not parts[0] or "=" in parts[0]:
        raise ValueError(f"model {family}: give the hidden size, e.g. '{family}:128' (or '{family}:128-128' "
                         "for two stacked layers)")
    hidden = _widths(family, parts[0], f"{family}:128")
    rest = parts[1:]
    act = "tanh"
    if family == "rnn" and rest and "=" not in rest[0]:
        act, rest = rest[0], rest[1:]
    opts = _options(family, rest, ("emb", "in", "drop") + (("fbias",) if family == "lstm" else ()))
    rate = float(opts.get("drop", 0.0))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"model {family}: drop= must be in [0, 1), got {rate}")

    def dropped(layer):                          # dropout after the layer when drop= > 0
        return [layer, dropout(rate)] if rate > 0 else [layer]

    if vocab_size:                               # text: ids -> embedding -> cells (every step) -> dense(V)
        if "in" in opts:
            raise ValueError(f"model {family}: in= is for signals; a text data set feeds token ids")
        layers = dropped(embedding(vocab_size, int(opts.get("emb", 64))))
        for h in hidden:
            layers += dropped(make_cell(h, act, True, opts))
    else:                                        # signals (N, L[, F]) -> (N, T, F) -> cells -> last state
        if "emb" in opts:
            raise ValueError(f"model {family}: emb= needs a text data set (token ids); this one has "
                             "real-valued inputs")
        try:
            in_shape = tuple(int(d) for d in opts.get("in", "-1x1").split("x"))
        except ValueError:
            raise ValueError(f"model {family}: in= must be (time)x(features), e.g. 40x1; got {opts['in']!r}") from None
        if len(in_shape) != 2:
            raise ValueError(f"model {family}: in= must give (time, features), got {in_shape}")
        layers = [reshape.reshape(in_shape)]
        for i, h in enumerate(hidden):
            layers += dropped(make_cell(h, act, i + 1 < len(hidden), opts))
    layers.append(dense(n_outputs, w_init="glorot"))
    return serial(*layers)


def gru(args: str, n_outputs: int, vocab_size: Optional[int] = None) -> Layer:
    """``gru:H[-H2...][:emb=E][:in=TxF][:drop=R]``: GRU layers of H (H2, ...) units, then ``dense(n_outputs)``.

    * Signals (real inputs (N, L), e.g. MNIST-1D): reshaped to (N, T, F)
      (``in=TxF``, default ``-1x1``: L steps of one feature), the layers run
      over time, the last one returns only its final state (N, H), and a
      dense layer maps it to the classes.
    * Text (``vocab_size`` V given: token ids (N, T)): ``embedding(V, E)``
      (``emb=E``, default 64), every layer returns every step (N, T, H), and
      ``dense(V)`` gives the next-character logits at each position.
    * ``drop=R``: dropout of rate R after the embedding (text) and after each
      recurrent layer (Zaremba et al. 2014: between layers, never on the
      recurrent state), so in training only; default 0, none.
    """
    return _recurrent_model("gru", args, n_outputs, vocab_size,
                            lambda h, act, seq, opts: gru_layer(h, return_sequences=seq))


def lstm(args: str, n_outputs: int, vocab_size: Optional[int] = None) -> Layer:
    """``lstm:H[-H2...][:emb=E][:in=TxF][:drop=R][:fbias=B]``: as :func:`gru` with LSTM layers;
    ``fbias=B`` adds B to each layer's forget-gate bias at init (``jp.lstm(forget_bias=B)``)."""
    def make(h, act, seq, opts):
        try:
            fbias = float(opts.get("fbias", 0.0))
        except ValueError:
            raise ValueError(f"model lstm: fbias= must be a number, got {opts['fbias']!r}") from None
        return lstm_layer(h, return_sequences=seq, forget_bias=fbias)
    return _recurrent_model("lstm", args, n_outputs, vocab_size, make)


def rnn(args: str, n_outputs: int, vocab_size: Optional[int] = None) -> Layer:
    """``rnn:H[-H2...][:tanh|relu][:emb=E][:in=TxF][:drop=R]``: as :func:`gru` with
    Elman RNN layers (activation tanh by default)."""
    return _recurrent_model("rnn", args, n_outputs, vocab_size,
                            lambda h, act, seq, opts: rnn_layer(h, activation=act, return_sequences=seq))


def _normal(key, a, std):
    return std * jax.random.normal(key, a.shape, a.dtype)


def _gpt_block_params(key, p, n_layers: int):
    """GPT-2's initialisation of one block's params (or L stacked ones):
    matrices N(0, 0.02^2), the two residual projections (attention's Wo and
    the MLP's second dense) N(0, (0.02 / sqrt(2L))^2), biases 0, layer norms 1 and 0."""
    (ln1, attn), (ln2, fc, act, proj) = p
    ks = jax.random.split(key, 6)
    std, res = 0.02, 0.02 / math.sqrt(2 * n_layers)
    attn = dict(attn, wq=_normal(ks[0], attn["wq"], std), wk=_normal(ks[1], attn["wk"], std),
                wv=_normal(ks[2], attn["wv"], std), wo=_normal(ks[3], attn["wo"], res),
                **{b: jnp.zeros_like(attn[b]) for b in ("bq", "bk", "bv", "bo")})
    fc = dict(fc, w=_normal(ks[4], fc["w"], std), b=jnp.zeros_like(fc["b"]))
    proj = dict(proj, w=_normal(ks[5], proj["w"], res), b=jnp.zeros_like(proj["b"]))
    return (ln1, attn), (ln2, fc, act, proj)


def gpt(args: str, n_outputs: int, vocab_size: Optional[int] = None, context: Optional[int] = None) -> Layer:
    r"""``gpt:L-D-H[:tied][:save=probs|lse][:mlp=4][:remat][:scan][:ctx=T]``: a GPT language model.

    Token ids (N, T) -> logits (N, T, V)::

        embedding(V, D), positional_embedding(T_max), L x transformer_block(H),
        layer_norm(), dense(V)                      (pre-LN blocks, GELU MLP of mlp*D)

    * ``tied``: the head's weight is the token embedding's, transposed
      (logits = h E^T + b; :func:`jaxprop.combinators.tied.tied`, whose
      gradient is the sum of both uses); the head keeps its own bias.
    * ``save=lse``: the attention layers keep only the row log-sum-exp (no
      T x T array; see ``jp.attention``).
    * ``remat``: each block caches only its input and recomputes in backward.
    * ``scan``: the L blocks as one ``repeat`` (a ``lax.scan`` over stacked
      weights: compile time independent of L) instead of a ``serial``.
    * ``ctx=T``: the longest sequence (positional table); default the data
      set's context.
    * ``block=B``: attention's ``block_size`` (default 128): with ``save=probs``
      the causal query blocks when T > B, with ``save=lse`` the key blocks.
      At context 128, ``block=32`` skips most of the masked half of Q K^T:
      the gpt:4-128-4 training step (bfloat16 operands, batch 32) took 0.943
      [0.934, 0.951] of the time with ``block=128`` (paired, one process).

    Initialisation (GPT-2): embeddings, attention and MLP matrices and the
    head N(0, 0.02^2); the residual projections (attention's output and the
    MLP's second layer) N(0, (0.02 / sqrt(2L))^2); biases 0; layer norms (1, 0).
    """
    parts = args.split(":") if args else []
    if not parts or not parts[0] or "=" in parts[0]:
        raise ValueError("model gpt: give layers-width-heads, e.g. 'gpt:2-64-4'")
    dims = _widths("gpt", parts[0], "gpt:2-64-4")
    if len(dims) != 3:
        raise ValueError(f"model gpt: expected L-D-H (layers, width, heads), got {parts[0]!r} (e.g. 'gpt:2-64-4')")
    n_layers, width, heads = dims
    if width % heads:
        raise ValueError(f"model gpt: the heads ({heads}) must divide the width ({width})")
    flags = {p for p in parts[1:] if p in ("tied", "remat", "scan")}
    opts = _options("gpt", [p for p in parts[1:] if p not in flags], ("save", "mlp", "ctx", "block"))
    if not vocab_size:
        raise ValueError("model gpt: needs a text data set (token ids), e.g. --dataset shakespeare")
    max_len = int(opts.get("ctx", context or 0))
    if max_len < 1:
        raise ValueError("model gpt: the context length is unknown; pass ctx=T in the spec or build it "
                         "with context=T")
    save = opts.get("save", "probs")
    block_arg = opts.get("block", "128")
    if not block_arg.isdigit() or int(block_arg) < 1:
        raise ValueError(f"model gpt: block= must be a positive integer, got {block_arg!r}")
    block_size = int(block_arg)
    block = transformer_block(heads, mlp_ratio=int(opts.get("mlp", 4)), causal=True, save=save,
                              block_size=block_size)
    if "remat" in flags:
        block = remat(block)
    blocks = [repeat(block, n_layers)] if "scan" in flags else [block] * n_layers
    layers = [embedding(vocab_size, width), positional_embedding(max_len), *blocks, norm.layer_norm(),
              dense(n_outputs)]
    head = len(layers) - 1
    net = serial(*layers)
    if "tied" in flags:
        if n_outputs != vocab_size:
            raise ValueError(f"model gpt: tied needs n_outputs == vocab_size, got {n_outputs} and {vocab_size}")
        net = tied(net, source=(0, "w"), target=(head, "w"), transpose=True)
    def init(key, in_shape):
        k_net, k_emb, k_head, k_blocks = jax.random.split(key, 4)
        out_shape, params = net.init(k_net, in_shape)
        params = list(params)
        params[0] = {"w": _normal(k_emb, params[0]["w"], 0.02)}
        if "tied" not in flags:
            params[head] = dict(params[head], w=_normal(k_head, params[head]["w"], 0.02))
        for i, k in zip(range(2, 2 + len(blocks)), jax.random.split(k_blocks, len(blocks))):
            params[i] = _gpt_block_params(k, params[i], n_layers)
        return out_shape, tuple(params)

    name = (f"gpt({n_layers}-{width}-{heads}{''.join(', ' + f for f in sorted(flags))}, save={save}"
            f"{'' if block_size == 128 else f', block={block_size}'}, ctx={max_len})")
    return Layer(init, net.forward, net.backward, name=name)


#: The one builder table: ``--model NAME:ARGS`` calls ``MODELS[NAME](ARGS, n_outputs)``.
MODELS: Dict[str, Callable[..., Layer]] = {"linear": linear, "mlp": mlp, "cnn": cnn, "gru": gru, "lstm": lstm,
                                           "rnn": rnn, "gpt": gpt}


def _accepts(fn, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(spec: str, n_outputs: int, *, vocab_size: Optional[int] = None,
                context: Optional[int] = None) -> Layer:
    """The network named by ``spec`` (see the module docstring) with ``n_outputs`` outputs.

    ``vocab_size`` / ``context``: a text data set's vocabulary size V and
    window length T (inputs are token ids); passed to the builders that
    declare these keywords. A builder that cannot take token ids is an error
    for text."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"build_model: spec must be a non-empty string such as 'mlp:100-100:relu', got {spec!r}")
    if not isinstance(n_outputs, int) or n_outputs < 1:
        raise ValueError(f"build_model: n_outputs must be a positive int, got {n_outputs!r}")
    name, _, args = spec.partition(":")
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r} in spec {spec!r}; registered: {sorted(MODELS)}")
    builder = MODELS[name]
    kwargs = {}
    for key, value in (("vocab_size", vocab_size), ("context", context)):
        if value is not None and _accepts(builder, key):
            kwargs[key] = value
    if vocab_size is not None and "vocab_size" not in kwargs:
        raise ValueError(f"build_model: model {name!r} does not take token ids; for a text data set use "
                         f"one of {sorted(k for k, f in MODELS.items() if _accepts(f, 'vocab_size'))}")
    return builder(args, n_outputs, **kwargs)
