"""How a :func:`jaxprop.train.fit` run stops when it cannot go on: each error
names the step and the last checkpoint kept, so the message says what to do."""
from __future__ import annotations

from typing import Optional


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite at ``step`` (the first such
    step, 0-based: the step whose batch loss was computed from the parameters
    after ``step`` updates). Nothing after the last finite evaluation is
    saved; ``checkpoint`` is the newest checkpoint kept (None without one)."""

    def __init__(self, message: str, step: int, checkpoint: Optional[str] = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`: ``step`` is the number of steps done,
    ``checkpoint`` the newest checkpoint kept (resume continues from it)."""

    def __init__(self, step: int, checkpoint: Optional[str] = None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


class ResumeMismatch(ValueError):
    """``resume=True`` with arguments that differ from the checkpointed run's
    (seed, batch size, data, net, loss, optimizer, steps, dtype)."""
