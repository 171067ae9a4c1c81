r"""The pre-LN transformer block (GPT-2's), composed from existing layers."""
from __future__ import annotations

import functools

from jaxprop.combinators import residual, serial
from jaxprop.core import Layer, call_forward, check_float, check_input, check_same_shape, shape_token, token_shape
from jaxprop.layers.activations import gelu
from jaxprop.layers.attention import SAVE_MODES, attention
from jaxprop.layers.dense import dense
from jaxprop.layers.norm import layer_norm


def transformer_block(heads: int, *, mlp_ratio: int = 4, causal: bool = True, save: str = "probs",
                      block_size: int = 128) -> Layer:
    r"""Pre-LN transformer block ``(N, T, D) -> (N, T, D)`` (GPT-2, Radford et al. 2019).

    Forward::

        h = x + attention(layer_norm(x))                          (N, T, D)
        y = h + dense(D)(gelu_tanh(dense(mlp_ratio D)(layer_norm(h))))

    It is built from existing layers, so its backward is theirs, composed::

        serial(residual(serial(layer_norm(), attention(heads, causal=causal, save=save,
                                                       block_size=block_size))),
               residual(serial(layer_norm(), dense(mlp_ratio D), gelu(approximate=True), dense(D))))

    ``serial`` runs the reverse sweep and each ``residual`` adds the gradient of
    its skip path, ``dx = dy + dx_block``: every formula is in those layers'
    docstrings (attention: dS = P * (dP - rowsum(dO * O)); layer norm:
    dx = r (dxhat - mean dxhat - xhat mean(dxhat xhat)); dense: dW = X^T dY).
    The width D is read from ``in_shape`` at init (and from x in forward).

    Args:
      heads: attention heads; must divide D.
      mlp_ratio: hidden width of the MLP as a multiple of D.
      causal: causal attention mask (default True: a language model's block).
      save: attention's cache, ``"probs"`` or ``"lse"`` (see :func:`attention`).
      block_size: attention's ``block_size``: the key blocks of ``save="lse"``,
        and for a causal ``save="probs"`` the query blocks when T > block_size.

    Params: ``((ln1, attn), (ln2, fc, (), proj))``: ln* ``{"scale", "offset"}`` (D,),
    attn ``{"wq", "wk", "wv", "wo": (D, D), "bq", "bk", "bv", "bo": (D,)}``,
    fc ``{"w": (D, mlp_ratio D), "b"}``, proj ``{"w": (mlp_ratio D, D), "b"}``.
    """
    if not isinstance(mlp_ratio, int) or mlp_ratio < 1:
        raise ValueError(f"transformer_block: mlp_ratio must be a positive int, got {mlp_ratio!r}")
    if save not in SAVE_MODES:
        raise ValueError(f"transformer_block: save must be 'probs' or 'lse', got {save!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"transformer_block: block_size must be a positive int, got {block_size!r}")
    attention(heads)                                           # validates heads
    name = f"transformer_block({heads}, mlp_ratio={mlp_ratio}{', causal' if causal else ''}, save={save})"

    @functools.lru_cache(maxsize=None)
    def net(dim):
        return serial(residual(serial(layer_norm(), attention(heads, causal=causal, save=save,
                                                              block_size=block_size))),
                      residual(serial(layer_norm(), dense(mlp_ratio * dim), gelu(approximate=True),
                                      dense(dim))))

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{name}: in_shape must be (N, T, D), got {in_shape}")
        return net(in_shape[-1]).init(key, in_shape)

    def forward(params, x, **ctx):
        check_float(name, x)
        check_input(name, x, ndim=3, what="input (N, T, D)")
        check_input(name, x, last=params[0][0]["scale"].shape[0])     # D of the first layer norm
        y, cache = call_forward(net(x.shape[-1]), params, x, **ctx)   # ctx (e.g. a future mask=) passes on
        return y, {"net": cache, "y_shape": shape_token(y)}

    def backward(cache, dy):
        shape = token_shape(cache["y_shape"])
        check_same_shape(name, shape, dy)
        return net(shape[-1]).backward(cache["net"], dy)

    return Layer(init, forward, backward, name=name)
