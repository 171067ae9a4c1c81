"""jaxprop: backpropagation written by hand, in pure jax.numpy, checked against jax.grad."""
from jaxprop.core import (Layer, Loss, call_forward, init_state, output_shape)
from jaxprop.layers.dense import dense
from jaxprop.layers.activations import (elementwise, identity, sigmoid, tanh, relu, leaky_relu, elu,
                                        softplus, gelu, silu, softmax, log_softmax)
from jaxprop.layers.reshape import flatten, reshape
from jaxprop.layers.dropout import dropout
from jaxprop.combinators import serial, residual
from jaxprop.losses import mse, softmax_cross_entropy, sigmoid_binary_cross_entropy
from jaxprop.grad import value_and_grad, grad
from jaxprop.check import check_gradients, check_layer, GradientReport
from jaxprop.bridge import as_custom_vjp
from jaxprop import initializers

__version__ = "0.1.0"

__all__ = [
    "Layer", "Loss", "call_forward", "init_state", "output_shape",
    "dense", "elementwise", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus",
    "gelu", "silu", "softmax", "log_softmax", "flatten", "reshape", "dropout",
    "serial", "residual",
    "mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy",
    "value_and_grad", "grad", "check_gradients", "check_layer", "GradientReport", "as_custom_vjp",
    "initializers",
]
from jaxprop.repeat import repeat, stack_params, unstack_params
from jaxprop.precision import (mixed_value_and_grad, cast_floating, LossScale, dynamic_loss_scale,
                               adjust_loss_scale, all_finite)
__all__ += ["repeat", "stack_params", "unstack_params", "mixed_value_and_grad", "cast_floating",
            "LossScale", "dynamic_loss_scale", "adjust_loss_scale", "all_finite"]
from jaxprop import checkpoint, data, models, train    # training: jp.train.fit, jp.data.load, jp.models.build_model
__all__ += ["checkpoint", "data", "models", "train"]
from jaxprop.layers.conv import conv1d, conv2d
from jaxprop.layers.pooling import max_pool, avg_pool, global_avg_pool
from jaxprop.layers.norm import batch_norm, layer_norm, group_norm
__all__ += ["conv1d", "conv2d", "max_pool", "avg_pool", "global_avg_pool", "batch_norm", "layer_norm",
            "group_norm"]
from jaxprop import complexity, paths   # the complexity study: path enumeration vs backprop
__all__ += ["complexity", "paths"]
from jaxprop.layers.augment import random_shift
__all__ += ["random_shift"]
