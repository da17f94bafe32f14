"""Ingot's Celery shell: the app, its queues, and thin tasks over `pipelines`."""
