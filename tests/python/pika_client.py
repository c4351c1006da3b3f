"""pika, RabbitMQ's Python client, against a running wasmq broker.

Run by tests/tests/integration/clients.rs as `python pika_client.py PORT`. Exits 0 and
prints "ok" when every step behaved as it does against RabbitMQ; any
surprise raises and exits non-zero with the traceback.
"""

import sys
import time

import pika
import pika.exceptions


def main(port: int) -> None:
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=30,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    # pika refuses confirms unless the server advertises publisher_confirms
    # and basic.nack.
    ch.confirm_delivery()

    ch.exchange_declare("pika.events", exchange_type="topic")
    q = ch.queue_declare("", exclusive=True).method.queue
    assert q.startswith("amq.gen-"), q
    ch.queue_bind(q, "pika.events", routing_key="orders.*")

    props = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        headers={"source": "pika", "attempt": 1, "tags": ["a", "b"]},
    )
    # Confirmed: basic_publish returns only after the broker's ack.
    ch.basic_publish("pika.events", "orders.created", b'{"id": 1}', props, mandatory=True)
    try:
        ch.basic_publish("pika.events", "users.created", b"nobody", mandatory=True)
        raise AssertionError("an unroutable mandatory publish was not returned")
    except pika.exceptions.UnroutableError as e:
        assert e.messages[0].method.reply_code == 312, e.messages[0].method

    got = []

    def on_message(channel, method, properties, body):
        got.append((method.routing_key, properties, body, method.redelivered))
        if not method.redelivered:
            # First time: ask for it again.
            channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            channel.basic_ack(method.delivery_tag)
            channel.stop_consuming()

    ch.basic_qos(prefetch_count=10)
    ch.basic_consume(q, on_message)
    def give_up():
        raise TimeoutError("no delivery within 10 s")

    conn.call_later(10, give_up)
    ch.start_consuming()
    assert [(k, b, r) for k, _, b, r in got] == [
        ("orders.created", b'{"id": 1}', False),
        ("orders.created", b'{"id": 1}', True),
    ], got
    p = got[1][1]
    assert p.content_type == "application/json" and p.delivery_mode == 2, p
    assert p.headers == {"source": "pika", "attempt": 1, "tags": ["a", "b"]}, p.headers

    method, _, _ = ch.basic_get(q, auto_ack=True)
    assert method is None, "queue drained"

    # A channel error closes that channel only.
    bad = conn.channel()
    try:
        bad.queue_declare("no-such-queue", passive=True)
        raise AssertionError("passive declare of a missing queue succeeded")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
    assert conn.is_open and ch.is_open

    # Transactions.
    tx = conn.channel()
    tx.tx_select()
    tx.basic_publish("pika.events", "orders.updated", b"rolled back")
    tx.tx_rollback()
    tx.basic_publish("pika.events", "orders.updated", b"committed")
    tx.tx_commit()
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"committed", body
    method, _, _ = ch.basic_get(q, auto_ack=True)
    assert method is None

    # A delayed exchange, as with RabbitMQ's delayed-message plugin: held
    # for its x-delay, then routed with the header negated.
    ch.exchange_declare(
        "pika.later",
        exchange_type="x-delayed-message",
        durable=True,
        arguments={"x-delayed-type": "direct"},
    )
    later = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(later, "pika.later", routing_key="k")
    sent = time.monotonic()
    ch.basic_publish(
        "pika.later", "k", b"later", pika.BasicProperties(headers={"x-delay": 300})
    )
    method, _, _ = ch.basic_get(later, auto_ack=True)
    assert method is None, "delivered before its x-delay"
    deadline = time.monotonic() + 10
    while True:
        method, props, body = ch.basic_get(later, auto_ack=True)
        if method is not None:
            break
        assert time.monotonic() < deadline, "the delayed message never came"
        time.sleep(0.02)
    assert body == b"later", body
    assert time.monotonic() - sent >= 0.3
    assert props.headers["x-delay"] == -300, props.headers

    conn.close()
    print("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
