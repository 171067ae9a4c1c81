"""Early stopping: stop when the watched metric has not improved for ``patience`` evaluations."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for
    ``patience`` evaluations. ``metric`` defaults to the evaluation set's
    accuracy (its loss for regression); ``mode`` to max for accuracy, min
    otherwise. Use it with a validation split (``data.validation_split``)."""

    patience: int
    metric: Optional[str] = None
    mode: Optional[str] = None
    min_delta: float = 0.0


def resolve(rule: Union[int, EarlyStopping, None], eval_name: str, classification: bool
            ) -> Optional[EarlyStopping]:
    """``rule`` (a patience or an :class:`EarlyStopping`) with metric and mode filled in."""
    if rule is None:
        return None
    if isinstance(rule, int):
        rule = EarlyStopping(patience=rule)
    metric = rule.metric or (f"{eval_name}_accuracy" if classification else f"{eval_name}_loss")
    mode = rule.mode or ("max" if metric.endswith("accuracy") else "min")
    if mode not in ("max", "min"):
        raise ValueError(f"EarlyStopping: mode must be 'max' or 'min', got {mode!r}")
    return dataclasses.replace(rule, metric=metric, mode=mode)


def initial_record() -> dict:
    """What a run remembers (and checkpoints) about early stopping."""
    return {"best": None, "best_step": None, "bad": 0, "stopped": False}


def update(record: dict, rule: Optional[EarlyStopping], row: dict) -> None:
    """Update ``record`` in place with the metrics ``row`` of one evaluation."""
    if rule is None:
        return
    v = row.get(rule.metric)
    if v is None:
        raise ValueError(f"EarlyStopping: metric {rule.metric!r} is not in the metrics {sorted(row)}")
    better = record["best"] is None or (v > record["best"] + rule.min_delta if rule.mode == "max"
                                        else v < record["best"] - rule.min_delta)
    if better:
        record.update(best=v, best_step=row["step"], bad=0)
    else:
        record["bad"] += 1
        if record["bad"] >= rule.patience:
            record["stopped"] = True


def best(record: dict) -> Optional[dict]:
    """``{"value", "step"}`` of the best evaluation so far, or None."""
    return None if record.get("best") is None else {"value": record["best"], "step": record["best_step"]}
