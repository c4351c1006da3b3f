"""redis-py over TLS (`ssl=True`) against wasmq's RESP-over-TLS listener.

Usage: redis_tls.py PORT CA_FILE. Prints "ok" at the end.
"""

import sys

import redis

port, ca = int(sys.argv[1]), sys.argv[2]
r = redis.Redis(
    host="127.0.0.1",
    port=port,
    username="guest",
    password="guest",
    ssl=True,
    ssl_ca_certs=ca,
    ssl_check_hostname=False,
)
assert r.ping()
assert r.lpush("over.tls", "secret") == 1
assert r.rpop("over.tls") == b"secret"
# A client that does not trust the broker's CA is refused.
try:
    redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_check_hostname=False).ping()
    raise AssertionError("an untrusted certificate was accepted")
except redis.exceptions.ConnectionError:
    pass
print("ok")
