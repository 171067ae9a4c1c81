"""The registry of layer cases: adding a layer means adding one entry here.

Every generic test (tests/test_layers.py) runs every case: gradient check
against jax.vjp with a random cotangent in float64 and float32, jitted and
not, finite differences, the custom_vjp bridge, and a bad-shape error.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

import jaxprop as jp


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], jp.Layer]
    in_shape: tuple
    ctx: dict = dataclasses.field(default_factory=dict)     # forward keywords (key/train/state)
    x_fn: Optional[Callable] = None                           # (key, shape, dtype) -> x
    rtol32: Optional[float] = None                            # float32 tolerance override
    fd: bool = True                                           # finite differences meaningful here
    bad_shape: Optional[tuple] = None                         # an input the layer must reject

    def __str__(self):
        return self.name


def away_from_zero(key, shape, dtype):
    """Inputs with |x| >= 0.1: finite differences never straddle a kink at 0."""
    k1, k2 = jax.random.split(key)
    mag = 0.1 + jax.random.uniform(k1, shape, dtype)
    return jax.random.choice(k2, jax.numpy.array([-1.0, 1.0], dtype), shape) * mag


DROP_KEY = jax.random.key(7)

CASES = [
    Case("dense", lambda: jp.dense(7), (5, 4), bad_shape=(5, 3)),
    Case("dense_nobias", lambda: jp.dense(3, bias=False, w_init="he"), (6, 5), bad_shape=(6, 4)),
    Case("dense_3d", lambda: jp.dense(4, w_init="lecun"), (3, 2, 5), bad_shape=(3, 2, 4)),
    Case("identity", jp.identity, (4, 3)),
    Case("sigmoid", jp.sigmoid, (4, 6)),
    Case("tanh", jp.tanh, (4, 6)),
    Case("relu", jp.relu, (5, 6), x_fn=away_from_zero),
    Case("leaky_relu", lambda: jp.leaky_relu(0.1), (5, 6), x_fn=away_from_zero),
    Case("elu", lambda: jp.elu(0.7), (5, 6), x_fn=away_from_zero),
    Case("softplus", jp.softplus, (4, 6)),
    Case("gelu", jp.gelu, (4, 6)),
    Case("gelu_tanh", lambda: jp.gelu(approximate=True), (4, 6)),
    Case("silu", jp.silu, (4, 6)),
    Case("softmax", jp.softmax, (4, 5)),
    Case("log_softmax", jp.log_softmax, (4, 5)),
    Case("flatten", jp.flatten, (3, 2, 4)),
    Case("reshape", lambda: jp.reshape((4, -1)), (3, 2, 4)),
    Case("dropout_train", lambda: jp.dropout(0.3), (6, 5), ctx={"key": DROP_KEY, "train": True}),
    Case("dropout_eval", lambda: jp.dropout(0.3), (6, 5), ctx={"train": False}),
    Case("serial", lambda: jp.serial(jp.dense(6), jp.tanh(), jp.dense(3)), (4, 5), bad_shape=(4, 6)),
    Case("serial_dropout", lambda: jp.serial(jp.dense(6), jp.dropout(0.5), jp.dense(3)), (4, 5),
         ctx={"key": DROP_KEY, "train": True}),
    Case("residual", lambda: jp.residual(jp.serial(jp.dense(5), jp.gelu(), jp.dense(5))), (4, 5),
         bad_shape=(4, 6)),
]

# repeat(block, n): lax.scan forward, reverse-scan backward. Residual and dropout blocks are
# compared with serial (itself checked here) in tests/test_repeat.py: eager scans recompile per call.
CASES.append(Case("repeat", lambda: jp.repeat(jp.serial(jp.dense(5), jp.tanh()), 3), (4, 5), bad_shape=(4, 6)))
