"""Ingot's domain library, one package per domain (core, jobs, ingestion, exports, curves, scenarios,
webhooks, auth). Never imports FastAPI or Celery."""

__version__ = "0.1.0"
