"""Old import path of :mod:`jaxprop.studies.paths` (kept for README's ``jaxprop.paths``)."""
from jaxprop.studies.paths import *  # noqa: F401,F403
from jaxprop.studies.paths import __all__  # noqa: F401
