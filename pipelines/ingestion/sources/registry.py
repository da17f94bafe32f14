"""The source registry: `sources.toml` read, validated and confined.

A bad declaration never hides the others: each source is either a valid `SourceConfig` or an error
that names the source and the field, shown on `/sources/{id}` and on any job that asks for it.
"""

from __future__ import annotations

import difflib
import glob
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.ingestion.datasets import DATASETS

DATA_TYPES = {"string", "int", "float", "datetime", "date", "month", "bool"}
_TYPE_ALIASES = {
    "integer": "int",
    "str": "string",
    "timestamp": "datetime",
    "boolean": "bool",
    "double": "float",
    "number": "float",
    "text": "string",
}
DATASET_FIELDS = {name: dataset.field_names for name, dataset in DATASETS.items()}


class SourceError(Exception):
    """A source that cannot be used as declared, or whose data cannot be read."""


class SourceContentError(SourceError):
    """The source was reached, but what it holds cannot be loaded (unreadable, columns missing)."""


class Validation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    required_columns: list[str] = Field(default_factory=list)
    data_types: dict[str, str] = Field(default_factory=dict)
    formats: dict[str, str] = Field(default_factory=dict)

    @field_validator("data_types")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for column, name in value.items():
            name = _TYPE_ALIASES.get(name.lower(), name.lower())
            if name not in DATA_TYPES:
                raise ValueError(f"column {column!r}: unknown type {name!r} (one of {sorted(DATA_TYPES)})")
            out[column] = name
        return out


class Pagination(BaseModel):
    """How an HTTP source pages: by page number, by offset, by a cursor in the body, or by next links."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "page", "offset", "cursor", "link"] = "none"
    param: str | None = None  # the query parameter carrying the page, offset or cursor
    size_param: str | None = None  # the query parameter carrying the page size
    size: int | None = Field(default=None, ge=1)
    start: int | None = None  # first page (default 1) or offset (default 0)
    cursor_path: str | None = None  # dotted path of the next cursor in the JSON body
    next_path: str | None = None  # dotted path of the next URL in the JSON body; else the Link header
    max_pages: int = Field(default=100_000, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> Pagination:
        if self.type in ("page", "offset", "cursor") and not self.param:
            raise ValueError(f"'{self.type}' pagination needs 'param' (the query parameter to set)")
        if self.type == "cursor" and not self.cursor_path:
            raise ValueError("'cursor' pagination needs 'cursor_path' (where the next cursor is in the body)")
        return self


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = ""
    type: Literal["file", "http"]
    format: Literal["csv", "parquet", "jsonl", "json"] = "csv"
    dataset: Literal["observations", "curves"] = "observations"
    enabled: bool = True
    schedule: str | None = None
    primary_key: list[str] = Field(default_factory=lambda: ["id"], min_length=1)
    cursor: str | None = None
    cursor_param: str | None = None  # http: query parameter that asks the API for rows past the cursor
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    skip_lines: int = Field(default=0, ge=0, le=10_000)  # CSV: lines before the header (a title, notes)
    encoding: str = "utf-8"
    # How numbers written as text mark decimals ("1,5" with ","), and a grouping mark to drop from them
    # ("1.234,5" with thousands = "."), as spreadsheets in much of Europe write them.
    # The zone of times written without one ("2026-03-29 01:00" as a Berlin exchange writes it): an IANA
    # name. A time its clocks skip or go through twice is quarantined, saying so.
    timezone: str = "UTC"
    decimal: Literal[".", ","] = "."
    thousands: Literal[".", ",", " ", "'", "\u00a0", "\u202f"] | None = None
    max_line_bytes: int | None = Field(default=None, ge=64)  # longer lines are quarantined (INGOT_MAX_LINE_BYTES)
    validation: Validation = Field(default_factory=Validation)
    mapping: dict[str, str] = Field(default_factory=dict)
    # file sources
    path: str | None = None
    # http sources (connector in a later module)
    url: str | None = None
    records_path: str | None = None
    pagination: Pagination = Field(default_factory=Pagination)
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, str | int | float] = Field(default_factory=dict)
    timeout: float = Field(default=30, gt=0)
    retries: int = Field(default=4, ge=0, le=10)
    max_response_bytes: int | None = Field(default=None, ge=1)
    # Other hosts its redirects and next-page links may lead to (its own headers are never sent there).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            from pipelines.jobs.schedules import parse

            parse(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, such as Europe/Berlin)") from None
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        from pipelines.ingestion.sources.lines import check_encoding

        return check_encoding(value)

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        if self.thousands == self.decimal:
            raise ValueError(f"'thousands' and 'decimal' are both {self.decimal!r}")
        if self.type == "file":
            if not self.path:
                raise ValueError("field 'path' is required for a file source")
        if self.type == "http":
            if not self.url:
                raise ValueError("field 'url' is required for an http source")
            if not self.url.startswith(("http://", "https://")):
                raise ValueError("field 'url' must be an http:// or https:// URL")
        fields = DATASET_FIELDS[self.dataset]
        for column, target in self.mapping.items():
            if target not in fields:
                raise ValueError(f"mapping {column!r} -> {target!r}: target must be one of {list(fields)}")
        key = DATASETS[self.dataset].key
        if key:  # the dataset's own key: the input columns that feed it, unless the declaration names them
            columns = [self.dataset_column(name) or name for name in key]
            if "primary_key" not in self.model_fields_set:
                self.primary_key = columns
            elif sorted(self.primary_key) != sorted(columns):
                raise ValueError(f"primary_key of a {self.dataset} source must be the columns that feed "
                                 f"{list(key)}: {columns}")
        return self

    def dataset_column(self, field_name: str) -> str | None:
        """The input column that feeds FIELD_NAME of the dataset, if any."""
        for column, target in self.mapping.items():
            if target == field_name:
                return column
        return field_name

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass
class Registry:
    """Every declared source, valid or not, plus where file sources may read from."""

    base_dir: Path
    roots: list[Path]
    # Never read, even inside a root: Ingot's own home (its secrets, export files, embedded databases).
    forbidden: list[Path] = field(default_factory=list)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def ids(self) -> list[str]:
        return sorted({*self.sources, *self.errors})

    def get(self, source_id: str) -> SourceConfig:
        """The valid declaration of SOURCE_ID; SourceError if it is invalid, KeyError if unknown."""
        if source_id in self.errors:
            raise SourceError(self.errors[source_id])
        return self.sources[source_id]

    def enabled(self) -> list[str]:
        return sorted(sid for sid, cfg in self.sources.items() if cfg.enabled)

    def files(self, source: SourceConfig) -> list[Path]:
        """The files SOURCE's glob matches now, in a stable order, each confined to the roots."""
        assert source.path is not None
        pattern = Path(source.path)
        if not pattern.is_absolute():
            pattern = self.base_dir / pattern
        matches = sorted(glob.glob(str(pattern), recursive=True))
        files = []
        for match in matches:
            real = Path(os.path.realpath(match))
            if self.hidden(real):  # a glob that also reaches INGOT_HOME (export files...) skips it
                continue
            if not self.allowed(real):
                raise SourceError(f"source '{source.id}': {match} resolves outside the allowed data folders")
            if real.is_file():
                files.append(real)
        if not files:
            raise SourceError(f"source '{source.id}': no file matches {source.path!r}")
        return files

    def display_path(self, path: Path) -> str:
        """PATH as quarantine rows show it: relative to sources.toml's folder when inside it."""
        return str(path.relative_to(self.base_dir)) if path.is_relative_to(self.base_dir) else str(path)

    def allowed(self, path: Path) -> bool:
        """Whether PATH (resolved) lies in a root and outside every forbidden folder."""
        return not self.hidden(path) and any(path == root or path.is_relative_to(root) for root in self.roots)

    def hidden(self, path: Path) -> bool:
        """Whether PATH (resolved) lies in a forbidden folder: Ingot's own files, never a source's."""
        return any(path.is_relative_to(gone) for gone in self.forbidden)


def _format_error(source_id: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = _unknown_field(item["loc"])
        parts.append(f"field '{where}': {message}" if where else message)
    return f"source '{source_id}': " + "; ".join(parts)


_SECTIONS: dict[str, type[BaseModel]] = {"validation": Validation, "pagination": Pagination}
_OTHER_NAMES = {"sep": "delimiter", "separator": "delimiter", "skiprows": "skip_lines", "skip_rows": "skip_lines",
                "tz": "timezone", "decimal_separator": "decimal", "thousands_separator": "thousands",
                "dtype": "validation.data_types", "dtypes": "validation.data_types",
                "date_format": "validation.formats", "parse_dates": "validation.formats", "url_params": "params"}


def _unknown_field(loc: tuple) -> str:
    """What to say of a key the declaration does not know: the one it most likely meant, if any."""
    model = _SECTIONS.get(str(loc[0]), SourceConfig) if len(loc) > 1 else SourceConfig
    key, fields = str(loc[-1]), list(model.model_fields)
    # Names other tools give these settings (pandas' read_csv above all), then a setting inside the key or
    # the key inside a setting ("page_param", "required"), then spelling.
    known = _OTHER_NAMES.get(key.lower())
    inside = sorted((f for f in fields if len(f) >= 4 and (f in key or key in f)), key=len, reverse=True)
    near = [known] if known else inside[:1] or difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
    return f"not a setting here (did you mean '{near[0]}'?)" if near else "not a setting here"


def _confinement_error(config: SourceConfig, registry: Registry) -> str | None:
    """Refuse, at declaration time, a glob whose fixed part already leads outside the roots."""
    if config.type != "file" or config.path is None:
        return None
    fixed = []
    for part in Path(config.path).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    if not base.is_absolute():
        base = registry.base_dir / base
    if not registry.allowed(Path(os.path.realpath(base))):
        return f"source '{config.id}': field 'path': {config.path!r} leads outside the allowed data folders"
    return None


def load_registry(path: Path, data_roots: list[Path] | None = None, home: Path | None = None) -> Registry:
    """Read PATH. A missing or unparsable file is a SourceError; a bad source is recorded, not raised.
    File sources read under PATH's folder or DATA_ROOTS, never under HOME (INGOT_HOME)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"sources file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"{path}: not valid TOML: {exc}") from None
    base_dir = path.resolve().parent
    registry = Registry(base_dir=base_dir, roots=[Path(os.path.realpath(base_dir)), *(data_roots or [])],
                        forbidden=[Path(os.path.realpath(home))] if home is not None else [])
    declared = document.get("sources", {})
    if not isinstance(declared, dict):
        raise SourceError(f"{path}: [sources] must be a table of sources")
    for source_id, body in declared.items():
        if not isinstance(body, dict):
            registry.errors[source_id] = f"source '{source_id}': must be a table"
            continue
        try:
            config = SourceConfig(id=source_id, **body)
        except ValidationError as exc:
            registry.errors[source_id] = _format_error(source_id, exc)
            continue
        except TypeError as exc:
            registry.errors[source_id] = f"source '{source_id}': {exc}"
            continue
        problem = _confinement_error(config, registry)
        if problem:
            registry.errors[source_id] = problem
        else:
            registry.sources[source_id] = config
    return registry
