"""Ingot's control plane: a slim FastAPI shell over `pipelines`, plus the client and the CLI."""
