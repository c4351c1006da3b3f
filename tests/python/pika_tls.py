"""pika over TLS against a running wasmq broker.

Run by tests/tests/integration/tls.rs as
`python pika_tls.py PORT CA_FILE CLIENT_CERT CLIENT_KEY`. The broker's
certificate is verified against CA_FILE (for 127.0.0.1). It logs in once
with a password (PLAIN, as user `app`) and once with the client
certificate (EXTERNAL: the broker takes the user from its CN, `app`),
publishes with confirms and reads back on each. Prints "ok" at the end.
"""

import ssl
import sys

import pika


def params(port, ca, cert, key, credentials):
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        ssl_options=pika.SSLOptions(context, "127.0.0.1"),
        credentials=credentials,
        heartbeat=30,
    )


def round_trip(conn, queue, body):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue)
    ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    method, _props, got = ch.basic_get(queue, auto_ack=True)
    assert method is not None, "the message is in the queue"
    assert got == body, got
    ch.queue_delete(queue)


def main(port, ca, cert, key):
    plain = pika.BlockingConnection(
        params(port, ca, cert, key, pika.PlainCredentials("app", "app-password"))
    )
    round_trip(plain, "pika.tls.plain", b"x" * 200_000)
    plain.close()

    external = pika.BlockingConnection(
        params(port, ca, cert, key, pika.credentials.ExternalCredentials())
    )
    round_trip(external, "pika.tls.external", b"by certificate")
    external.close()
    print("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
