"""pika against a wasmq stream queue, the way RabbitMQ's documentation
shows streams used from an AMQP 0-9-1 client.

Run by tests/tests/integration/streams.rs as `python pika_streams.py PORT`.
Prints "ok" when every step behaved as it does against RabbitMQ.
"""

import datetime
import sys

import pika
import pika.exceptions


def connect(port: int) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host="127.0.0.1",
            port=port,
            credentials=pika.PlainCredentials("guest", "guest"),
        )
    )


def read(ch, queue: str, n: int, arguments: dict) -> list:
    """Consume n messages with the given consume arguments, acking each;
    returns (offset, body) pairs."""
    got = []

    def on_message(channel, method, properties, body):
        got.append((properties.headers["x-stream-offset"], body))
        channel.basic_ack(method.delivery_tag)
        if len(got) == n:
            channel.stop_consuming()

    ch.basic_qos(prefetch_count=100)
    tag = ch.basic_consume(queue, on_message, arguments=arguments)

    def give_up():
        raise TimeoutError(f"only {len(got)} of {n} messages within 10 s")

    timer = ch.connection.call_later(10, give_up)
    ch.start_consuming()
    ch.connection.remove_timeout(timer)
    ch.basic_cancel(tag)
    return got


def main(port: int) -> None:
    conn = connect(port)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(
        "pika.stream",
        durable=True,
        arguments={"x-queue-type": "stream", "x-max-age": "7D"},
    )
    for i in range(50):
        region = "eu" if i % 2 == 0 else "us"
        ch.basic_publish(
            "",
            "pika.stream",
            f"event {i}".encode(),
            pika.BasicProperties(headers={"x-stream-filter-value": region}),
        )

    everything = read(ch, "pika.stream", 50, {"x-stream-offset": "first"})
    assert [o for o, _ in everything] == list(range(50)), everything
    assert everything[7][1] == b"event 7"
    # Reading removed nothing: a second reader sees it all again.
    again = read(ch, "pika.stream", 50, {"x-stream-offset": "first"})
    assert again == everything
    tail = read(ch, "pika.stream", 25, {"x-stream-offset": 25})
    assert [o for o, _ in tail] == list(range(25, 50)), tail
    # A timestamp (pika sends a datetime as an AMQP timestamp) before
    # everything starts at the first message.
    hour_ago = datetime.datetime.now() - datetime.timedelta(hours=1)
    since = read(ch, "pika.stream", 1, {"x-stream-offset": hour_ago})
    assert since[0][0] == 0, since
    eu = read(
        ch, "pika.stream", 25, {"x-stream-offset": "first", "x-stream-filter": "eu"}
    )
    assert all(o % 2 == 0 for o, _ in eu), eu

    # basic.get is not for streams: RabbitMQ closes the connection (540).
    try:
        ch.basic_get("pika.stream")
        raise AssertionError("basic.get on a stream was not refused")
    except pika.exceptions.ConnectionClosedByBroker as e:
        assert e.reply_code == 540, e

    # Neither is a consumer without a prefetch (406, on its channel).
    conn = connect(port)
    ch = conn.channel()
    try:
        ch.basic_consume("pika.stream", lambda *a: None)
        raise AssertionError("a stream consumer without a prefetch was accepted")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 406, e
    conn.close()
    print("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
