"""The experiment runner ``jaxprop-train`` (``python experiments/train.py``): an application of
the library, not part of it -- nothing in jaxprop's layers, gradients or training loop imports it.

=================  ==========================================================================
``cli``            ``build_parser``, ``run``, ``main``, ``DATASET_DEFAULTS``: options -> run folder
``models``         ``build_model``, ``MODELS``: the one builder table of ``--model`` specs
``optimizers``     ``make_optimizer``: any optax alias by name, with a learning-rate schedule
``plots``          ``plot_learning_curves``
``rundir``         the run folder: file paths, config.json, summary.json
``sample``         ``jaxprop-sample``: text from a trained character model; vocab.json, bpc
=================  ==========================================================================

Import the parts you use (``from jaxprop.runner.optimizers import make_optimizer``);
this package's ``__init__`` imports none of them, so ``jaxprop.models`` does not
load the command line.
"""
