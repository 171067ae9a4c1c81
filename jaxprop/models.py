"""Old path of :mod:`jaxprop.runner.models` (``jaxprop.models.build_model``, ``jaxprop.models.MODELS``)."""
from jaxprop.runner.models import ACTIVATIONS, MODELS, build_model, cnn, linear, mlp

__all__ = ["ACTIVATIONS", "MODELS", "build_model", "cnn", "linear", "mlp"]
