"""The compiled functions of :func:`jaxprop.train.fit`, cached per configuration.

* ``initial(net, tx, in_shape, dtype)``: ``k_init -> (params, model_state, opt_state)``.
* ``permutation(k_data, epoch, n)``: the data order of one epoch.
* ``compiled(net, loss, tx, grad, batch_size, mesh)``: the fused training step
  -- gather the batch from the data set on the device, the one train step of
  :func:`jaxprop.train.make_train_step`, add the loss to a running sum -- and
  the evaluation function.

They are cached so that repeated runs of one configuration (seeds, hand vs
autodiff) compile once: the net, the loss and the optimizer are hashable
records, so the same objects hit the cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxprop.core import cast_floating, init_state
from jaxprop.train.evaluate import make_eval_fn
from jaxprop.train.step import grad_function, make_train_step, step_kind


def cached(fn, *args):
    """``fn(*args)`` through its lru_cache, or directly for unhashable arguments."""
    try:
        hash(args)
    except TypeError:
        return fn.__wrapped__(*args)
    return fn(*args)


@functools.lru_cache(maxsize=32)
def initial(net, tx, in_shape, dtype_name):
    """Jitted ``k_init -> (params, model_state, opt_state)`` in ``dtype`` (one compile)."""

    def build(k_init):
        _, params = net.init(k_init, in_shape)
        params = cast_floating(params, dtype_name)
        state = cast_floating(init_state(net, in_shape), dtype_name)
        return params, state, tx.init(params)

    return jax.jit(build)


@functools.partial(jax.jit, static_argnums=2)
def permutation(k_data, epoch, n):
    """The data order of one epoch: a pure function of (data key, epoch)."""
    return jax.random.permutation(jax.random.fold_in(k_data, epoch), n)


@functools.lru_cache(maxsize=32)
def compiled(net, loss, tx, grad, batch_size, mesh=None, windows=0):
    """``(fused_step, eval_fn)``. ``fused_step(params, opt_state, state, loss_acc,
    bad, x_all, t_all, perm, b, s, k_drop) -> (params, opt_state, state,
    loss_acc, bad)`` runs step ``s``: batch ``b`` of the epoch's order
    ``perm``, dropout key ``fold_in(k_drop, s)``. ``bad`` (int32, -1 while
    every batch loss was finite) becomes ``s`` at the first step whose loss
    is NaN or infinite: the loop learns which step diverged without waiting
    on every step. With ``windows=T`` (a token stream), ``x_all``
    is the stream and ``perm`` orders the window starts i: the batch is
    ``x = x_all[i:i+T]``, ``t = x_all[i+1:i+T+1]`` (``t_all`` is unused). With a ``mesh`` it is compiled by
    :func:`jaxprop.distributed.shard_step` (everything replicated) and the
    gathered batch is split over ``"data"`` -- the data-parallel step."""
    stateful, stochastic = step_kind(net)
    step = make_train_step(grad_function(net, loss, grad), tx, net=net, jit=False)
    if mesh is not None:
        from jaxprop import distributed as dist   # distributed imports the step; not the other way round

    def fused(params, opt_state, state, loss_acc, bad, x_all, t_all, perm, b, s, k_drop):
        idx = jax.lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
        if windows:                                        # rows i .. i+T of the stream, then shift by one
            w = jnp.take(x_all, idx[:, None] + jnp.arange(windows + 1)[None, :], axis=0)
            x, t = w[:, :-1], w[:, 1:]
        else:
            x, t = jnp.take(x_all, idx, axis=0), jnp.take(t_all, idx, axis=0)
        if mesh is not None:
            x, t = dist.constrain_batch((x, t), mesh)      # each device gathers only its rows
        key = jax.random.fold_in(k_drop, s) if stochastic else None
        params, opt_state, aux = step(params, opt_state, x, t, key=key, state=state if stateful else None)
        value, state = aux if stateful else (aux, state)
        bad = jnp.where((bad < 0) & ~jnp.isfinite(value), jnp.asarray(s, bad.dtype), bad)
        return params, opt_state, state, loss_acc + value, bad

    donated = (0, 1, 2, 3, 4)
    if mesh is None:
        return jax.jit(fused, donate_argnums=donated), make_eval_fn(net, loss)
    return dist.shard_step(fused, mesh, batch_argnums=(), donate_argnums=donated), make_eval_fn(net, loss)
