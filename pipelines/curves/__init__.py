"""Forward curves: the points as stored, one curve against another, and what the curves cover
(dimensions, locations)."""
