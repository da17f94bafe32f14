"""worker.broker: the app's Redis channels build one Redis client for their commands, not one a
command, and a new one only when the channel replaces its pool; the messages go out all the same."""

from __future__ import annotations

import pytest
from kombu import Exchange, Producer, Queue

QUEUE = "test-broker-clients"


def test_a_channel_publishes_through_one_client_until_its_pool_is_replaced():
    from worker.app import app, rabbitmq
    from worker.broker import Channel

    if rabbitmq(app.conf.broker_url):
        pytest.skip("the broker is RabbitMQ: kombu's Redis transport is not in use")
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        built = []
        client_class = channel.Client

        def counted(**kwargs):
            built.append(kwargs)
            return client_class(**kwargs)

        channel.Client = counted
        queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)
        producer = Producer(channel, exchange=queue.exchange, routing_key=QUEUE)
        producer.maybe_declare(queue)
        channel.queue_purge(QUEUE)
        for n in range(5):
            producer.publish({"n": n})
        assert len(built) == 1  # kombu's own channel builds one a command: five here, and more for the purge
        assert channel.queue_declare(QUEUE, passive=True).message_count == 5
        old = channel.pool
        channel._disconnect_pools()  # as after a fork, or a reconnection
        producer.publish({"n": 5})
        assert len(built) == 2 and channel.pool is not old
        assert channel.queue_declare(QUEUE, passive=True).message_count == 6
        assert sorted(channel.basic_get(QUEUE, no_ack=True).payload["n"] for _ in range(6)) == list(range(6))
        channel.queue_delete(QUEUE)
