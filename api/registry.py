"""The source registry as the routes see it: read fresh per request, so edits apply at once."""

from api.envelope import ApiError
from pipelines.ingestion.ingest import current_registry
from pipelines.ingestion.sources.registry import Registry, SourceError


def registry_or_error() -> Registry:
    try:
        return current_registry()
    except SourceError as exc:
        raise ApiError(500, f"the sources file cannot be read: {exc}") from None
