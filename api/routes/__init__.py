"""The HTTP contract, one module per area: each route parses, calls one service, shapes the answer."""
