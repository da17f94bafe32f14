"""Webhooks: endpoints and their secrets, the outbox relay, signed delivery, and the guard
that keeps outbound calls off private networks."""
