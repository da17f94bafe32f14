"""Ingot's control plane: the HTTP app, a slim FastAPI shell over `pipelines` (the CLI and the
client live in `cli`)."""
