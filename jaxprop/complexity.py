"""Old import path of :mod:`jaxprop.studies.complexity` (kept for README's ``jaxprop.complexity``)."""
from jaxprop.studies.complexity import *  # noqa: F401,F403
from jaxprop.studies.complexity import __all__  # noqa: F401
