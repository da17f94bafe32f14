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
