"""Old path of :mod:`jaxprop.runner.cli` (``jaxprop.cli.main``, ``jaxprop.cli.run``,
``jaxprop.cli.DATASET_DEFAULTS``); ``python -m jaxprop.cli`` still runs the runner."""
import sys

from jaxprop.runner.cli import (DATASET_DEFAULTS, GENERIC_DEFAULTS, UsageError, build_parser, main,
                                resolve_config, run)
from jaxprop.runner.optimizers import SCHEDULES, make_optimizer
from jaxprop.runner.plots import plot_learning_curves
from jaxprop.runner.rundir import default_out, summarize, write_json_atomic

__all__ = ["DATASET_DEFAULTS", "GENERIC_DEFAULTS", "SCHEDULES", "UsageError", "build_parser", "default_out",
           "main", "make_optimizer", "plot_learning_curves", "resolve_config", "run", "summarize",
           "write_json_atomic"]

if __name__ == "__main__":
    sys.exit(main())
