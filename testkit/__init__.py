"""What the tests and the benchmarks share: webhook receivers (honest and hostile), data generators,
the curve source, polling with a deadline, and the fault suite's mixed load with its ledger. The
benchmarks import nothing from `tests/`; both import from here."""
