"""Webhooks: endpoints and their secrets, the outbox relay, and signed delivery (the guard that
keeps outbound calls off private networks is `pipelines.core.netguard`)."""
