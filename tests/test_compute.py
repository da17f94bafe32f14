"""What a scenario run computes, on its own: shocks in order, and the four figures, checked against
pandas' group-by on random curves (no database, no worker)."""

import numpy as np
import pandas as pd
import pytest

from pipelines.scenarios import compute


def months(*texts: str) -> np.ndarray:
    return np.array([f"{t}-01" for t in texts], dtype="datetime64[D]")


def test_shocks_apply_in_order_and_a_tenor_shock_only_inside_its_months():
    values = np.array([10.0, 20.0, 30.0])
    shocked = compute.apply(values, months("2027-01", "2027-02", "2027-03"), [
        {"type": "parallel", "value": 1.0},
        {"type": "percent", "value": 10},
        {"type": "tenor", "from": "2027-02", "to": "2027-03", "value": -2.0},
    ])
    assert shocked.tolist() == pytest.approx([12.1, 21.1, 32.1])
    assert values.tolist() == [10.0, 20.0, 30.0]  # the base is left as it was
    # the other order gives another answer: order matters
    reversed_ = compute.apply(values, months("2027-01", "2027-02", "2027-03"), [
        {"type": "percent", "value": 10}, {"type": "parallel", "value": 1.0}])
    assert reversed_.tolist() == pytest.approx([12.0, 23.0, 34.0])


def test_figures_match_a_group_by_over_random_curves_with_zero_bases():
    rng = np.random.default_rng(7)
    keys = np.repeat(np.array([f"C{i:02d}" for i in range(12)], dtype=object), rng.integers(1, 30, 12))
    base = np.round(rng.normal(40, 30, len(keys)), 2)
    base[::9] = 0.0  # months whose base is 0 are left out of the percent change
    change = rng.normal(0, 3, len(keys))
    per_curve, total = compute.metrics(*compute.curve_bounds(keys), base, change)

    frame = pd.DataFrame({"key": keys, "base": base, "change": change})
    frame["weight"] = frame["base"].abs()
    frame["pct"] = np.where(frame["weight"] > 0, 100 * frame["change"] / frame["weight"].where(frame["weight"] > 0),
                            np.nan)
    grouped = frame.groupby("key", sort=True)
    expected = {
        "mean_change": grouped["change"].mean(),
        "max_abs_change": grouped["change"].apply(lambda c: c.abs().max()),
        "mean_pct_change": grouped["pct"].mean(),
        "value_weighted_change": grouped.apply(lambda g: (g["change"] * g["weight"]).sum() / g["weight"].sum()
                                               if g["weight"].sum() > 0 else np.nan, include_groups=False),
    }
    for name, series in expected.items():
        np.testing.assert_allclose(per_curve[name], series.to_numpy(dtype="float64"), rtol=1e-12, equal_nan=True)
    assert total["mean_change"] == pytest.approx(change.mean())
    assert total["max_abs_change"] == pytest.approx(np.abs(change).max())
    assert total["mean_pct_change"] == pytest.approx(frame["pct"].mean())
    assert total["value_weighted_change"] == pytest.approx((change * np.abs(base)).sum() / np.abs(base).sum())


def test_a_curve_whose_every_base_is_zero_has_no_percent_or_weighted_figure():
    per_curve, total = compute.metrics(*compute.curve_bounds(np.array(["A", "A", "B"], dtype=object)),
                                       np.array([0.0, 0.0, 5.0]), np.array([1.0, -3.0, 1.0]))
    assert per_curve["max_abs_change"].tolist() == [3.0, 1.0]
    assert np.isnan(per_curve["mean_pct_change"][0]) and per_curve["mean_pct_change"][1] == pytest.approx(20.0)
    assert np.isnan(per_curve["value_weighted_change"][0])
    assert total["mean_pct_change"] == pytest.approx(20.0)
