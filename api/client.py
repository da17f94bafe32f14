"""The Python client lives in `cli.client`; this name stays importable for scripts written against it."""

from cli.client import Client, IngotError

__all__ = ["Client", "IngotError"]
