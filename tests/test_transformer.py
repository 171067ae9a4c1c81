"""transformer_block: registry cases, equal to its composition, save modes agree, equal to PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.combinators import residual, serial
from jaxprop.layers.activations import gelu
from jaxprop.layers.attention import attention
from jaxprop.layers.dense import dense
from jaxprop.layers.norm import layer_norm
from jaxprop.layers.transformer import transformer_block
from helpers import init_params

# Registry entries (transformer_block, transformer_block_lse) are in jaxprop.testing.CASES.


def _composition(heads, mlp_ratio, width, causal, save):
    """The block written out with serial/residual: x + attention(layer_norm(x)), then
    x + dense(D)(gelu_tanh(dense(mlp_ratio D)(layer_norm(x))))."""
    return serial(residual(serial(layer_norm(), attention(heads, causal=causal, save=save))),
                  residual(serial(layer_norm(), dense(mlp_ratio * width), gelu(approximate=True),
                                  dense(width))))


def _run(layer, params, x, dy):
    y, cache = layer.forward(params, x)
    return y, layer.backward(cache, dy)


def test_block_is_its_composition_and_save_modes_agree():
    shape, dy_key = (2, 7, 6), jax.random.key(9)
    block = transformer_block(3, mlp_ratio=2)
    _, params = block.init(jax.random.key(0), shape)
    _, params_c = _composition(3, 2, 6, True, "probs").init(jax.random.key(0), shape)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_c)
    assert params[1][1]["w"].shape == (6, 12) and params[1][3]["w"].shape == (12, 6)
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(dy_key, shape)
    outs = []
    for layer in (block, _composition(3, 2, 6, True, "probs"), transformer_block(3, mlp_ratio=2, save="lse")):
        outs.append(jax.jit(lambda p, xx, layer=layer: _run(layer, p, xx, dy))(params, x))
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[2])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_block_size_reaches_the_attention():
    """transformer_block(block_size=B) is attention(block_size=B) inside: at T = 7 > B = 2 the
    causal save="probs" cache holds P by query blocks (the first one (N, H, 2, 2)), with the same
    output and gradients as the default's single (N, H, 7, 7) P."""
    shape = (2, 7, 6)
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    dy = jax.random.normal(jax.random.key(2), shape, jnp.float64)
    outs, p_shapes = [], []
    for block in (transformer_block(3, mlp_ratio=2), transformer_block(3, mlp_ratio=2, block_size=2)):
        _, params = init_params(block, jax.random.key(0), shape)
        y, cache = block.forward(params, x)
        outs.append((y, block.backward(cache, dy)))
        p_shapes.append({np.shape(a) for a in jax.tree_util.tree_leaves(cache) if np.ndim(a) == 4})
    assert (2, 3, 7, 7) in p_shapes[0] and (2, 3, 2, 2) not in p_shapes[0]
    assert (2, 3, 2, 2) in p_shapes[1] and (2, 3, 7, 7) not in p_shapes[1]
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_block_errors():
    with pytest.raises(ValueError, match="heads=3 must divide"):
        transformer_block(3).init(jax.random.key(0), (2, 4, 8))
    for bad in (dict(save="x"), dict(mlp_ratio=0), dict(block_size=0)):
        with pytest.raises(ValueError, match="transformer_block"):
            transformer_block(2, **bad)


def _torch_block(torch, params, x, heads, causal):
    """The pre-LN block in PyTorch (scaled_dot_product_attention, layer_norm, GELU-tanh) on
    jaxprop's params mapped one to one: x + attn(ln1(x)), then + proj(gelu(fc(ln2(.))))."""
    f = torch.nn.functional
    (ln1, at), (ln2, fc, _, proj) = params
    n, t, dim = x.shape

    def mha(h):
        q, k, v = ((h @ at["w" + c] + at["b" + c]).reshape(n, t, heads, dim // heads).transpose(1, 2)
                   for c in "qkv")
        o = f.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return o.transpose(1, 2).reshape(n, t, dim) @ at["wo"] + at["bo"]

    hid = x + mha(f.layer_norm(x, (dim,), ln1["scale"], ln1["offset"], eps=1e-5))
    u = f.layer_norm(hid, (dim,), ln2["scale"], ln2["offset"], eps=1e-5)
    return hid + f.gelu(u @ fc["w"] + fc["b"], approximate="tanh") @ proj["w"] + proj["b"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_block_equals_pytorch(causal):
    torch = pytest.importorskip("torch")
    heads, shape = 2, (2, 9, 8)
    block = transformer_block(heads, causal=causal, save="lse")
    _, params = block.init(jax.random.key(0), shape)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [a + 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i), a.shape)
              for i, a in enumerate(leaves)]                   # nonzero biases, non-unit scales
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(jax.random.key(2), shape)
    y, (grads, dx) = jax.jit(lambda p, xx: _run(block, p, xx, dy))(params, x)

    tl = [torch.tensor(np.asarray(a), requires_grad=True) for a in leaves]
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    ty = _torch_block(torch, jax.tree_util.tree_unflatten(treedef, tl), tx, heads, causal)
    ty.backward(torch.tensor(np.asarray(dy)))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for g, tg in zip(jax.tree_util.tree_leaves(grads), tl):
        np.testing.assert_allclose(g, tg.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec", ["gpt:2-8-2:tied", "gpt:2-8-2:save=lse"])
def test_gpt_equals_pytorch(spec):
    """The runner's whole GPT (embeddings, 2 blocks, final layer norm, head; tied: logits = h E^T + b)
    and its mean next-token cross-entropy equal PyTorch's on the same weights: the loss, and every
    gradient of jp.value_and_grad, the tied embedding's being the sum of its two uses."""
    torch = pytest.importorskip("torch")
    from jaxprop.runner.models import build_model

    vocab, (n, t), heads = 11, (3, 7), 2
    net = build_model(spec, vocab, vocab_size=vocab, context=t)
    _, params = net.init(jax.random.key(0), (n, t))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [a + 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i), a.shape)
              for i, a in enumerate(leaves)]                   # nonzero biases, non-unit scales
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    ids = jax.random.randint(jax.random.key(1), (n, t + 1), 0, vocab)
    x, y = ids[:, :-1], ids[:, 1:]
    value, grads = jax.jit(jp.value_and_grad(net, jp.softmax_cross_entropy()))(params, x, y)

    tl = [torch.tensor(np.asarray(a), requires_grad=True) for a in leaves]
    tp = jax.tree_util.tree_unflatten(treedef, tl)
    emb, pos, blocks, ln, head = tp[0]["w"], tp[1]["w"], tp[2:-2], tp[-2], tp[-1]
    h = emb[torch.tensor(np.asarray(x))] + pos[:t]
    for block in blocks:
        h = _torch_block(torch, block, h, heads, causal=True)
    h = torch.nn.functional.layer_norm(h, (h.shape[-1],), ln["scale"], ln["offset"], eps=1e-5)
    logits = h @ (emb.T if "tied" in spec else head["w"]) + head["b"]
    tloss = torch.nn.functional.cross_entropy(logits.reshape(n * t, vocab), torch.tensor(np.asarray(y)).reshape(-1))
    tloss.backward()
    np.testing.assert_allclose(float(value), tloss.item(), rtol=1e-12)
    g_leaves = jax.tree_util.tree_leaves(grads)
    assert len(g_leaves) == len(tl)
    for g, tg in zip(g_leaves, tl):
        np.testing.assert_allclose(g, tg.grad.numpy(), rtol=1e-9, atol=1e-12)
