"""Ingot's domain library: sources, validation, loading, jobs. Never imports FastAPI or Celery."""

__version__ = "0.1.0"
