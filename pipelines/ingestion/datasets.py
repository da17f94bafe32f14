"""The datasets a source can feed, declared once: their fields, types, key and table.

Validation, loading and the API read these declarations; nothing else knows which dataset it is
working on. `observations` is keyed on (source, id), the id made from the source's `primary_key`,
and lives in one partition per source. `curves` is keyed on its own fields, whatever the source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetField:
    name: str
    kind: str  # a validation type: string, float, datetime, date, month


@dataclass(frozen=True)
class Dataset:
    name: str
    fields: tuple[DatasetField, ...]
    key: tuple[str, ...] = ()  # fields that identify a row; empty: the source's primary_key makes the id
    table: str | None = None  # None: one partition of `observations` per source

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def kind(self, field_name: str) -> str:
        return next(f.kind for f in self.fields if f.name == field_name)


OBSERVATIONS = Dataset("observations", (DatasetField("timestamp", "datetime"), DatasetField("value", "float")))
CURVES = Dataset(
    "curves",
    (
        DatasetField("curve_key", "string"),
        DatasetField("asof_date", "date"),
        DatasetField("contract_month", "month"),
        DatasetField("tenor_label", "string"),
        DatasetField("value", "float"),
        DatasetField("currency", "string"),
        DatasetField("unit", "string"),
        DatasetField("asset_class", "string"),
        DatasetField("iso", "string"),
        DatasetField("location", "string"),
    ),
    key=("curve_key", "asof_date", "contract_month"),
    table="curves",
)
DATASETS = {d.name: d for d in (OBSERVATIONS, CURVES)}
