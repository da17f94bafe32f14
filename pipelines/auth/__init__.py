"""Who may call: API keys (hashed, scoped), users and their tokens, rate-limit buckets."""
