"""Training with optax: one jitted step, a ``fit`` loop, evaluation, checkpoints.

The step is plain optax around any gradient function with the call shape of
``jax.value_and_grad(cost)``::

    grad_fn = jp.value_and_grad(net, loss)          # hand-written backward passes
    grad_fn = jaxprop.autodiff.value_and_grad(net, loss)   # or: jax.value_and_grad of the same forward
    step = make_train_step(grad_fn, tx, net=net)
    params, opt_state, value = step(params, opt_state, x, y)            # plain net
    params, opt_state, value = step(params, opt_state, x, y, key=k)     # dropout
    params, opt_state, (value, state) = step(params, opt_state, x, y, state=state)  # batch norm

so a hand-written run and an autodiff run differ by one argument.

``fit`` runs epochs of shuffled mini-batches, bit-reproducible from one seed
and resumable from its checkpoints (see :mod:`jaxprop.train.loop`).

The parts, one concept each:

=============  ==============================================================
``step``       ``make_train_step``, ``grad_function``: the one training step
               (also the step of :func:`jaxprop.distributed.data_parallel_step`)
``loop``       ``fit``, ``FitResult``
``plan``       fit's checked arguments and its data on the device
``state``      the training state and its checkpoints
``fused``      fit's compiled functions (init, data order, fused step), cached
``evaluate``   ``make_eval_fn``, ``evaluate``, ``accuracy``
``metrics``    the metrics file, ``params_fingerprint``, the progress bar
``stopping``   ``EarlyStopping``
``tasks``      ``LossSpec``, ``loss_spec``: a loss bound to a data set
``identity``   what a resumed run must share with its checkpoints
``errors``     ``NonFiniteLoss``, ``Interrupted``, ``ResumeMismatch``
=============  ==============================================================
"""
from jaxprop.checkpoint import CorruptCheckpoint, RecoveryWarning
from jaxprop.core import cast_floating
from jaxprop.train.errors import Interrupted, NonFiniteLoss, ResumeMismatch
from jaxprop.train.evaluate import accuracy, count_correct, evaluate, make_eval_fn, predicted_labels
from jaxprop.train.loop import FitResult, fit
from jaxprop.train.metrics import MetricsFile, json_safe, params_fingerprint, prepare_metrics_file, read_jsonl
from jaxprop.train.step import check_step_args, grad_function, make_train_step, step_kind
from jaxprop.train.stopping import EarlyStopping
from jaxprop.train.tasks import LOSS_ALIASES, LOSS_NAMES, LossSpec, default_loss, loss_spec

__all__ = [
    "CorruptCheckpoint", "EarlyStopping", "FitResult", "Interrupted", "LOSS_ALIASES", "LOSS_NAMES",
    "LossSpec", "MetricsFile", "NonFiniteLoss", "RecoveryWarning", "ResumeMismatch", "accuracy",
    "cast_floating", "check_step_args", "count_correct", "default_loss", "evaluate", "fit",
    "grad_function", "json_safe", "loss_spec", "make_eval_fn", "make_train_step", "params_fingerprint",
    "predicted_labels", "prepare_metrics_file", "read_jsonl", "step_kind",
]
