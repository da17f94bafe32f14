"""Scenarios: what-if shocks over forward curves, their runs as jobs, outputs, metrics and charts."""
