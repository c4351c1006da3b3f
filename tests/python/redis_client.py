"""redis-py, unchanged, against wasmq's RESP front end, with pika on the
same broker: lists are queues, channels are routing keys of amq.topic.

Usage: redis_client.py REDIS_PORT AMQP_PORT. Prints "ok" at the end; any
failed check raises.
"""

import sys
import threading
import time

import pika
import redis

REDIS_PORT = int(sys.argv[1])
AMQP_PORT = int(sys.argv[2])


def client(**kw):
    return redis.Redis(
        host="127.0.0.1", port=REDIS_PORT, username="guest", password="guest", **kw
    )


def amqp():
    return pika.BlockingConnection(
        pika.ConnectionParameters(host="127.0.0.1", port=AMQP_PORT)
    )


# Without a password nothing but a login is served; a wrong one is refused.
try:
    redis.Redis(host="127.0.0.1", port=REDIS_PORT).lpush("x", "y")
    raise AssertionError("a command without AUTH was served")
except redis.exceptions.AuthenticationError:
    pass
try:
    redis.Redis(
        host="127.0.0.1", port=REDIS_PORT, username="guest", password="nope"
    ).ping()
    raise AssertionError("a wrong password was taken")
except redis.exceptions.AuthenticationError:
    pass

r = client()
assert r.ping()
assert r.echo("hi") == b"hi"
r.client_setname("worker-1")
assert r.client_getname() == "worker-1"

# A list is a FIFO queue: LPUSH + RPOP and RPUSH + LPOP.
assert r.lpush("jobs", "a", "b", "c") == 3
assert r.llen("jobs") == 3
assert r.rpop("jobs") == b"a"
assert r.rpop("jobs", 5) == [b"b", b"c"]
assert r.rpop("jobs") is None
assert r.rpop("jobs", 2) is None
assert r.rpush("jobs", "d", "e") == 2
assert r.lpop("jobs") == b"d"
assert r.lpop("jobs") == b"e"
# LRANGE peeks in the order a pop takes, leaving the messages there.
r.rpush("peek", "p1", "p2", "p3")
assert r.lrange("peek", 0, -1) == [b"p1", b"p2", b"p3"]
assert r.lrange("peek", -2, 10) == [b"p2", b"p3"]
assert r.lrange("peek", 5, 9) == []
assert r.llen("peek") == 3
assert r.lpop("peek", 3) == [b"p1", b"p2", b"p3"]
assert r.lpushx("nobody", "x") == 0
assert r.llen("nobody") == 0

# A pipeline of pushes is answered together, in order.
p = r.pipeline(transaction=False)
for i in range(1000):
    p.lpush("bulk", f"m{i}")
replies = p.execute()
assert replies[-1] == 1000, replies[-5:]
assert [r.rpop("bulk") for _ in range(3)] == [b"m0", b"m1", b"m2"]
assert r.delete("bulk", "never") == 1
assert r.llen("bulk") == 0

# Blocking pops: a timeout answers None, a push wakes the blocked client,
# keys are tried in order.
start = time.monotonic()
assert r.brpop(["empty1", "empty2"], timeout=0.3) is None
assert time.monotonic() - start >= 0.25
r.lpush("second", "s")
assert r.brpop(["first", "second"], timeout=1) == (b"second", b"s")

got = []


def blocked():
    got.append(client().blpop(["wake"], timeout=5))


t = threading.Thread(target=blocked)
t.start()
time.sleep(0.3)
r.rpush("wake", "up")
t.join()
assert got == [(b"wake", b"up")], got

# Blocked clients share out what arrives, each message to one of them.
results = []


def worker():
    c = client()
    while True:
        v = c.brpop(["shared"], timeout=1)
        if v is None:
            return
        results.append(v[1])


workers = [threading.Thread(target=worker) for _ in range(3)]
for w in workers:
    w.start()
time.sleep(0.3)
for i in range(30):
    r.lpush("shared", f"w{i}")
for w in workers:
    w.join()
assert sorted(results) == sorted(f"w{i}".encode() for i in range(30)), results

# The reliable-queue pattern: move to a processing list, atomically.
r.lpush("inbox", "task")
assert r.lmove("inbox", "processing", "RIGHT", "LEFT") == b"task"
assert r.llen("inbox") == 0 and r.llen("processing") == 1
assert r.rpoplpush("processing", "done") == b"task"
assert r.blmove("empty3", "done", 0.2, "RIGHT", "LEFT") is None
r.lpush("inbox", "later")
assert r.brpoplpush("inbox", "done", timeout=1) == b"later"
assert r.llen("done") == 2

# Errors: an unknown command, one wasmq does not serve, a wrong arity;
# the connection stays usable.
for cmd, text in [
    (("FOO", "bar"), "unknown command 'FOO'"),
    (("GET", "k"), "GET is not served"),
    (("LSET", "k", "0", "v"), "LSET is not served"),
    (("LPUSH", "k"), "wrong number of arguments"),
    (("BRPOP", "k", "soon"), "timeout is not a float"),
    (("SELECT", "3"), "only SELECT 0"),
]:
    try:
        r.execute_command(*cmd)
        raise AssertionError(f"{cmd} was served")
    except redis.exceptions.ResponseError as e:
        assert text in str(e), (cmd, str(e))
assert r.ping()

# Pub/sub: channels, Redis globs (not AMQP topic words), PUBSUB.
sub = client().pubsub()
sub.subscribe("news.sport")
sub.psubscribe("news.*", "h?llo")
for _ in range(3):
    assert sub.get_message(timeout=2)["type"] in ("subscribe", "psubscribe")
assert r.pubsub_channels() == [b"news.sport"]
assert r.pubsub_numsub("news.sport") == [(b"news.sport", 1)]
assert r.pubsub_numpat() == 2
assert r.publish("news.sport", "goal") == 2
assert r.publish("news.sport.today", "match") == 1
assert r.publish("hello", "there") == 1
assert r.publish("nobody", "x") == 0
seen = []
while len(seen) < 4:
    m = sub.get_message(timeout=2)
    assert m is not None, seen
    seen.append((m["type"], m["pattern"], m["channel"], m["data"]))
assert sorted(seen) == sorted(
    [
        ("message", None, b"news.sport", b"goal"),
        ("pmessage", b"news.*", b"news.sport", b"goal"),
        ("pmessage", b"news.*", b"news.sport.today", b"match"),
        ("pmessage", b"h?llo", b"hello", b"there"),
    ]
), seen

# RESP3 (HELLO 3): the same commands, pushes for pub/sub.
r3 = client(protocol=3)
assert r3.lpush("r3", "x") == 1
assert r3.rpop("r3") == b"x"
assert r3.rpop("r3") is None

# AMQP and Redis on the same queues and channels.
conn = amqp()
ch = conn.channel()
ch.confirm_delivery()
r.lpush("shared.q", "from redis")
method, _, body = ch.basic_get("shared.q", auto_ack=True)
assert body == b"from redis", body
ch.basic_publish(
    "", "shared.q", b"from pika", pika.BasicProperties(delivery_mode=2)
)
assert r.rpop("shared.q") == b"from pika"
ch.basic_publish("amq.topic", "news.sport", b"from amqp")
m = sub.get_message(timeout=2)
assert m is not None and m["data"] == b"from amqp", m
m = sub.get_message(timeout=2)
assert m is not None and m["data"] == b"from amqp", m
q = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(q, "amq.topic", "events.#")
assert r.publish("events.created", "e1") == 1
deadline = time.monotonic() + 2
while True:
    method, _, body = ch.basic_get(q, auto_ack=True)
    if method:
        break
    assert time.monotonic() < deadline
    time.sleep(0.02)
assert body == b"e1", body
sub.close()
conn.close()

print("ok")
