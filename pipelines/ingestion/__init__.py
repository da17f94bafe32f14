"""Ingestion: sources (declarations and connectors), validation, loading into partitions,
the run itself, quarantine, probing a source and the source catalog."""
