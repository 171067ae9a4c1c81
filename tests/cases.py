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
    Case("relu_save_output", lambda: jp.relu(save="output"), (5, 6), x_fn=away_from_zero),
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
# Finite differences off: an eager scan recompiles per call; repeat's forward is checked equal to
# serial's (which has finite differences here) in tests/test_repeat.py.
CASES.append(Case("repeat", lambda: jp.repeat(jp.serial(jp.dense(5), jp.tanh()), 3), (4, 5), bad_shape=(4, 6),
                  fd=False))

# CNN layers (issue #5): every conv/pool/norm layer and mode once, with odd sizes, strides that do not
# divide the input, dilation with stride, groups. More configurations (circular padding, depthwise,
# 1-D/2-D pooling variants), ties and the batch-norm state update are in tests/test_conv.py,
# test_pooling.py and test_norm.py (jitted: the eager checks here compile op by op and cost ~10 s each).
CNN_CASES = [
    Case("conv1d", lambda: jp.conv1d(4, 3, stride=2, dilation=2, groups=2), (2, 13, 2), bad_shape=(2, 13, 3)),
    Case("conv2d", lambda: jp.conv2d(3, (3, 2), stride=(2, 3), padding=((1, 0), (2, 1)), dilation=(2, 1)),
         (2, 9, 8, 2), bad_shape=(2, 9, 8, 3)),
    Case("max_pool", lambda: jp.max_pool((3, 2), (2, 1), ((1, 0), (0, 1))), (2, 7, 6, 2), bad_shape=(2, 7)),
    Case("avg_pool", lambda: jp.avg_pool(3, 2, "SAME"), (2, 10, 3), bad_shape=(2, 10)),
    Case("global_avg_pool", jp.global_avg_pool, (2, 4, 5, 3), bad_shape=(2, 5)),
    Case("batch_norm", lambda: jp.batch_norm(0.8), (3, 5, 4), ctx={"train": True}, bad_shape=(3, 5, 3)),
    Case("batch_norm_eval", lambda: jp.batch_norm(), (3, 5, 4),
         ctx={"train": False, "state": {"mean": jax.numpy.array([0.5, -1.0, 0.2, 2.0]),
                                         "var": jax.numpy.array([2.0, 0.5, 1.5, 3.0])}}),
    Case("layer_norm", jp.layer_norm, (3, 5, 4), bad_shape=(3, 5, 3)),
    Case("group_norm", lambda: jp.group_norm(3), (2, 3, 4, 6), bad_shape=(2, 3, 4, 5)),
    Case("cnn1d_bn_residual", lambda: jp.serial(
        jp.conv1d(4, 3, stride=2, bias=False), jp.batch_norm(), jp.relu(),
        jp.residual(jp.serial(jp.conv1d(4, 3, bias=False), jp.batch_norm(), jp.tanh())),
        jp.max_pool(2), jp.global_avg_pool(), jp.dense(3)), (4, 12, 2), ctx={"train": True}),
]
CASES += CNN_CASES
CASES.append(Case("random_shift", lambda: jp.random_shift(2), (3, 7, 2), ctx={"key": DROP_KEY, "train": True}))
