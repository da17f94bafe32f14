"""What a scenario run computes, on columns: shocks applied in order, and the four figures per curve
and over the whole run. Pure functions of NumPy arrays (the base points in curve and month order), so
their cost is a few array passes whatever the number of curves, and they are tested on their own."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.scenarios.definitions import parse_month

METRICS = ("mean_change", "max_abs_change", "mean_pct_change", "value_weighted_change")


def apply(values: np.ndarray, months: np.ndarray, shocks: list[dict]) -> np.ndarray:
    """VALUES after SHOCKS, in order; MONTHS (datetime64[D]) says which month each value is for."""
    shocked = values.astype("float64", copy=True)
    for shock in shocks:
        if shock["type"] == "parallel":
            shocked += shock["value"]
        elif shock["type"] == "percent":
            shocked *= 1 + shock["value"] / 100
        else:
            inside = (months >= np.datetime64(parse_month(shock["from"]), "D")) & \
                     (months <= np.datetime64(parse_month(shock["to"]), "D"))
            shocked = np.where(inside, shocked + shock["value"], shocked)
    return shocked


def curve_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each curve's rows start and end in KEYS (sorted by curve)."""
    if not len(keys):
        return np.array([], dtype=int), np.array([], dtype=int)
    starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1))  # (np.r_ costs more than this)
    return starts, np.append(starts[1:], len(keys))


def metrics(starts: np.ndarray, ends: np.ndarray, base: np.ndarray, change: np.ndarray
            ) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """The four figures per curve (arrays in the order of the curves, which begin at STARTS and end
    before ENDS: `curve_bounds`) and over all points; `mean_pct_change` leaves out months whose base is
    0, and a figure with nothing to average is NaN per curve and None in total."""
    change = change.astype("float64", copy=False)
    weight = np.abs(base.astype("float64", copy=False))
    nonzero = weight > 0
    pct = np.where(nonzero, 100 * change / np.where(nonzero, weight, 1.0), 0.0)

    def per(values: np.ndarray, ufunc: np.ufunc = np.add) -> np.ndarray:
        return ufunc.reduceat(values, starts) if len(starts) else np.array([], dtype="float64")

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.full(len(top), np.nan), where=bottom > 0)

    weighted = change * weight
    per_curve = {
        "mean_change": per(change) / (ends - starts),
        "max_abs_change": per(np.abs(change), np.maximum),
        "mean_pct_change": ratio(per(pct), per(nonzero.astype("float64"))),
        "value_weighted_change": ratio(per(weighted), per(weight)),
    }
    total = {
        "mean_change": _number(change.mean()) if len(change) else None,
        "max_abs_change": _number(np.abs(change).max()) if len(change) else None,
        "mean_pct_change": _number(pct[nonzero].mean()) if nonzero.any() else None,
        "value_weighted_change": _number(weighted.sum() / weight.sum()) if weight.sum() > 0 else None,
    }
    return per_curve, total


def _number(value: Any) -> float | None:
    return None if value is None or value != value else float(value)


def beyond_float(keys: np.ndarray, starts: np.ndarray, months: np.ndarray, base: np.ndarray, shocked: np.ndarray,
                 change: np.ndarray, per_curve: dict[str, np.ndarray], total: dict[str, float | None]) -> str | None:
    """Why a run's figures cannot be kept, or None: shocks that take a value, or a figure over the
    curves (which begin at STARTS, `curve_bounds`), past the largest finite double (about 1.8e308). Such
    a run fails with this reason; its figures would be infinities, which JSON (the API's answers, the
    job's result) cannot hold."""
    bad = np.flatnonzero(~(np.isfinite(shocked) & np.isfinite(change)))
    if len(bad):
        i = bad[0]
        return (f"the shocks take {keys[i]} {str(months[i])[:7]} (base {base[i]:g}) past the largest number a "
                f"figure can hold (about 1.8e308): {len(bad)} point(s) in all; use smaller shock values")
    for name, values in per_curve.items():
        over = np.flatnonzero(np.isinf(values))
        if len(over):
            return (f"the shocks make {name} of {keys[starts[over[0]]]} larger than a figure can "
                    f"hold (about 1.8e308); use smaller shock values")
    for name, value in total.items():
        if value is not None and not np.isfinite(value):
            return f"the shocks make the total {name} larger than a figure can hold (about 1.8e308)"
    return None
