"""The data query over ingested observations."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, model_validator

from api.deps import Reader, SessionDep
from api.envelope import CURSOR_PATTERN, Envelope, IsoDateTime, UTCDateTime, ok
from pipelines.exports import query

router = APIRouter(prefix="/data", tags=["data"])
MAX_OFFSET = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DateRange(_Strict):
    start: IsoDateTime | None = Field(default=None, description="from this time on (a date alone: its midnight, UTC)")
    end: IsoDateTime | None = Field(default=None, description="up to this time, included")

    @model_validator(mode="after")
    def _in_order(self) -> DateRange:
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError("'start' is after 'end'")
        return self


class ValueRange(_Strict):
    min: StrictFloat | None = Field(default=None, allow_inf_nan=False)
    max: StrictFloat | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _in_order(self) -> ValueRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("'min' is above 'max'")
        return self


class Filters(_Strict):
    source: str | None = Field(default=None, max_length=200)
    date_range: DateRange = Field(default_factory=DateRange)
    value_range: ValueRange = Field(default_factory=ValueRange)


class Pagination(_Strict):
    page: int | None = Field(default=None, ge=1, le=1_000_000)
    cursor: str | None = Field(default=None, pattern=CURSOR_PATTERN)
    limit: int = Field(default=100, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_mode(self) -> Pagination:
        if self.page is not None and self.cursor is not None:
            raise ValueError("give either 'page' or 'cursor', not both")
        if self.page is not None and (self.page - 1) * self.limit > MAX_OFFSET:
            # Each page deeper costs the database a scan of every row before it: go on with the cursor.
            raise ValueError(f"pages reach {MAX_OFFSET:,} rows deep at most; follow 'next_cursor' further")
        return self


class Sort(_Strict):
    field: Literal["timestamp", "value", "id", "source", "ingested_at"] = "timestamp"
    order: Literal["asc", "desc"] = "asc"


class QueryRequest(_Strict):
    filters: Filters = Field(default_factory=Filters)
    pagination: Pagination = Field(default_factory=Pagination)
    sort: Sort = Field(default_factory=Sort)


class Record(BaseModel):
    id: str
    source: str
    timestamp: UTCDateTime | None
    value: float | None
    metadata: dict[str, Any]


class PageInfo(BaseModel):
    page: int | None
    limit: int
    total: int = Field(description="rows the filters match; at least this many when total_exact is false "
                                   "(totals are counted to 100,000)")
    total_exact: bool
    pages: int
    next_cursor: str | None


class QueryResult(BaseModel):
    records: list[Record]
    pagination: PageInfo


@router.post("/query", response_model=Envelope[QueryResult])
def query_data(body: QueryRequest, request: Request, response: Response, session: SessionDep, _caller: Reader) -> dict:
    f, p = body.filters, body.pagination
    q = query.Query(
        source=f.source, start=f.date_range.start, end=f.date_range.end, min_value=f.value_range.min,
        max_value=f.value_range.max, sort=body.sort.field, descending=body.sort.order == "desc",
        limit=p.limit, page=p.page, cursor=p.cursor,
    )
    rows, info = query.run(session, q)
    for name in ("page", "limit", "total", "pages"):
        if info[name] is not None:
            response.headers[f"X-Pagination-{name.title()}"] = str(info[name])
    records = [{"id": r.id, "source": r.source, "timestamp": r.timestamp, "value": r.value,
                "metadata": r.metadata_} for r in rows]
    return ok(request, {"records": records, "pagination": info})
