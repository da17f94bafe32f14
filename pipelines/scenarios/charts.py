"""A scenario run as a picture: base and shocked curves, one panel per curve key (matplotlib, Agg)."""

from __future__ import annotations

import io
import math

import pandas as pd

MAX_PANELS = 24  # beyond this a page of panels is unreadable: the first ones are drawn, the title says so
COLUMNS = 3


def render_png(frame: pd.DataFrame, title: str) -> bytes:
    """FRAME (`curve_key`, `contract_month`, `unit`, `base`, `shocked`) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, whatever the environment says
    from matplotlib import pyplot as plt
    from matplotlib.dates import DateFormatter

    keys = list(dict.fromkeys(frame["curve_key"]))
    shown = keys[:MAX_PANELS]
    columns = min(COLUMNS, max(len(shown), 1))
    rows = max(math.ceil(len(shown) / columns), 1)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    try:
        for index, key in enumerate(shown):
            ax = axes[index // columns][index % columns]
            curve = frame[frame["curve_key"] == key].sort_values("contract_month")
            months = pd.to_datetime(curve["contract_month"])
            ax.plot(months, curve["base"], label="base", color="#1f77b4", linewidth=1.6)
            ax.plot(months, curve["shocked"], label="shocked", color="#d62728", linewidth=1.6, linestyle="--")
            ax.set_title(key, fontsize=10)
            unit = next((u for u in curve["unit"] if u), None)
            ax.set_ylabel(f"value ({unit})" if unit else "value")
            ax.set_xlabel("contract month")
            ax.xaxis.set_major_formatter(DateFormatter("%Y-%m"))
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for index in range(len(shown), rows * columns):
            axes[index // columns][index % columns].set_visible(False)
        more = f" (first {len(shown)} of {len(keys)} curves)" if len(keys) > len(shown) else ""
        figure.suptitle(title + more)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(figure)
