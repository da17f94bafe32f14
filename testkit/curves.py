"""The forward-curve source the tests and benchmarks declare, and a CSV writer for its rows."""

from __future__ import annotations

import csv

from pipelines.curves.synthetic import COLUMNS

CURVES_SOURCE = """
[sources.curves]
type = "file"
format = "csv"
path = "data/{glob}"
dataset = "curves"
[sources.curves.validation]
required_columns = ["curve_key", "asof_date", "contract_month", "value"]
data_types = {{ asof_date = "date", contract_month = "month", value = "float" }}
"""


def write_curves(path, rows) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
