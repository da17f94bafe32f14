"""Sources: declarations read from sources.toml, and one module per connector type."""

from pipelines.ingestion.sources.registry import Registry, SourceConfig, SourceError, load_registry

__all__ = ["Registry", "SourceConfig", "SourceError", "load_registry"]
