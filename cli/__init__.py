"""The `ingot` command (typer), the `ingot up` supervisor, and the Python client both are built on."""
