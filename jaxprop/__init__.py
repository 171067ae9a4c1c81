"""jaxprop: backpropagation written by hand, in pure jax.numpy, checked against jax.grad."""
from jaxprop import checkpoint, data, initializers, models, testing, train  # jp.train.fit, jp.data.load, ...
from jaxprop.bridge import as_custom_vjp
from jaxprop.check import GradientReport, check_gradients, check_layer
from jaxprop.combinators import Cell, remat, residual, scan, serial, tied
from jaxprop.core import Layer, Loss, call_forward, init_state, output_shape
from jaxprop.grad import Sweep, forward_backward, grad, value_and_grad
from jaxprop.layers.activations import (elementwise, elu, gelu, identity, leaky_relu, log_softmax, relu,
                                        sigmoid, silu, softmax, softplus, tanh)
from jaxprop.layers.attention import attention
from jaxprop.layers.augment import random_shift
from jaxprop.layers.conv import conv1d, conv2d
from jaxprop.layers.dense import dense
from jaxprop.layers.dropout import dropout
from jaxprop.layers.embedding import embedding
from jaxprop.layers.norm import batch_norm, group_norm, layer_norm
from jaxprop.layers.pooling import avg_pool, global_avg_pool, max_pool
from jaxprop.layers.positional import positional_embedding
from jaxprop.layers.recurrent import bidirectional, gru, lstm, rnn
from jaxprop.layers.reshape import flatten, reshape
from jaxprop.layers.transformer import transformer_block
from jaxprop.losses import mse, sigmoid_binary_cross_entropy, softmax_cross_entropy
from jaxprop.per_example import dp_value_and_grad, per_example_grad_norms, per_example_grads  # + jp.per_example
from jaxprop.precision import (LossScale, adjust_loss_scale, all_finite, cast_floating, dynamic_loss_scale,
                               mixed_value_and_grad)
# through the old path first, so that a later `import jaxprop.repeat` cannot rebind jp.repeat
from jaxprop.repeat import repeat, stack_params, unstack_params

__version__ = "0.1.0"

__all__ = [
    "Cell", "GradientReport", "Layer", "Loss", "LossScale", "Sweep", "adjust_loss_scale",
    "all_finite", "as_custom_vjp", "attention", "avg_pool", "batch_norm", "bidirectional",
    "call_forward", "cast_floating", "check_gradients", "check_layer", "checkpoint", "conv1d",
    "conv2d", "data", "dense", "dp_value_and_grad", "dropout", "dynamic_loss_scale", "elementwise",
    "elu", "embedding", "flatten", "forward_backward", "gelu", "global_avg_pool", "grad",
    "group_norm", "gru", "identity", "init_state", "initializers", "layer_norm", "leaky_relu",
    "log_softmax", "lstm", "max_pool", "mixed_value_and_grad", "models", "mse", "output_shape",
    "per_example", "per_example_grad_norms", "per_example_grads", "positional_embedding",
    "random_shift", "relu", "remat", "repeat", "reshape", "residual", "rnn", "scan", "serial",
    "sigmoid", "sigmoid_binary_cross_entropy", "silu", "softmax", "softmax_cross_entropy",
    "softplus", "stack_params", "tanh", "testing", "tied", "train", "transformer_block", "unstack_params",
    "value_and_grad",
]
