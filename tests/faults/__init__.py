"""The fault suite: the real system under a mixed load, faults injected, counted against the ledger."""
