"""Test inputs: CSV files with known good rows and bad rows at known lines."""

from __future__ import annotations

from pathlib import Path

SOURCES = """
[sources.{name}]
name = "Test prices"
type = "file"
format = "csv"
path = "data/{glob}"
primary_key = ["id"]
[sources.{name}.validation]
required_columns = ["id", "timestamp", "px"]
data_types = {{ timestamp = "datetime", px = "float" }}
[sources.{name}.mapping]
px = "value"
"""


def sources_toml(name: str = "prices", glob: str = "*.csv") -> str:
    return SOURCES.format(name=name, glob=glob)


def write_csv(path: Path, rows: int, bad_every: int = 0, start: int = 0) -> tuple[int, list[int]]:
    """ROWS data lines; every BAD_EVERY-th has an unparseable px. Returns (good count, bad lines)."""
    bad_lines = []
    with path.open("w") as fh:
        fh.write("id,timestamp,px,hub\n")
        for i in range(start, start + rows):
            line = i - start + 2
            bad = bad_every and (i - start + 1) % bad_every == 0
            if bad:
                bad_lines.append(line)
            px = "n/a" if bad else f"{i * 0.25:.2f}"
            fh.write(f"r{i:08d},2026-01-01T00:{i % 60:02d}:00Z,{px},hub-{i % 7}\n")
    return rows - len(bad_lines), bad_lines


def write_series(path: Path, start: int, count: int, append: bool = False) -> None:
    """COUNT rows r{start}.. with timestamps one minute apart, growing with the row number."""
    import datetime as dt

    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with path.open("a" if append else "w") as fh:
        if not append:
            fh.write("id,timestamp,px,hub\n")
        for i in range(start, start + count):
            stamp = (base + dt.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            fh.write(f"r{i:08d},{stamp},{i * 0.5},hub-{i % 5}\n")


INCREMENTAL = SOURCES.replace('primary_key = ["id"]', 'primary_key = ["id"]\ncursor = "timestamp"')


def incremental_toml(name: str = "prices", glob: str = "*.csv") -> str:
    return INCREMENTAL.format(name=name, glob=glob)
