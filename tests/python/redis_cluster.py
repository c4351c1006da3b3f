"""redis-py, unchanged, against the RESP front ends of a wasmq cluster.
Run by engine/tests/cluster.rs and engine/tests/quorum.rs:

  redis_cluster.py across PORT_A PORT_B
      a list whose queue lives on node a, used from node b: every command
      that reaches another node's queue; then pub/sub between the two
      nodes. Prints "ok".
  redis_cluster.py push PORT KEY FROM TO
      LPUSH "FROM".."TO-1" one at a time, each tried again on an error
      (for up to 60 s) as a client that must not lose a message does;
      prints the JSON list of those acknowledged, and of those that got an
      error first.
  redis_cluster.py drain PORT KEY
      BRPOP until the list stays empty for 5 s; prints the JSON list of
      what came.
"""

import json
import sys
import threading
import time

import redis


def client(port):
    return redis.Redis(
        host="127.0.0.1",
        port=int(port),
        username="guest",
        password="guest",
        socket_timeout=30,
    )


def across(port_a, port_b):
    ra, rb = client(port_a), client(port_b)
    key = "rc.across"
    # Declared through the cluster by node a's push: it lives on a.
    assert ra.lpush(key, "m1", "m2", "m3") == 3
    # Popped from b: asked of a, in order, one or a count.
    assert rb.rpop(key) == b"m1", "RPOP from another node"
    assert rb.rpop(key, 2) == [b"m2", b"m3"], "RPOP with a count"
    assert rb.rpop(key) is None
    assert rb.rpop(key, 3) is None
    # A blocking pop on b is served by a push on a.
    late = threading.Timer(0.5, lambda: client(port_a).lpush(key, "late"))
    late.start()
    assert rb.brpop(key, timeout=10) == (key.encode(), b"late"), "BRPOP from another node"
    late.join()
    # One that times out answers nil, as Redis does.
    started = time.monotonic()
    assert rb.brpop(key, timeout=1) is None
    assert time.monotonic() - started >= 0.9
    # Pushed on b, into a's queue: the reply waits for a's confirm.
    assert rb.lpush(key, "from-b") == 1
    assert ra.rpop(key) == b"from-b"
    # A move out of a's queue into one that lives on b.
    assert rb.lpush("rc.on-b", "x") == 1
    ra.lpush(key, "mv")
    assert rb.lmove(key, "rc.on-b", "RIGHT", "LEFT") == b"mv"
    assert rb.rpop("rc.on-b", 2) == [b"x", b"mv"]
    assert ra.llen(key) == 0, "the moved message left its source"
    # And the reverse: from b's queue (remote to a) into a's.
    rb.lpush("rc.on-b", "back")
    assert ra.rpoplpush("rc.on-b", key) == b"back"
    assert ra.rpop(key) == b"back"
    # A blocking move from a's queue, served by a later push.
    late = threading.Timer(0.5, lambda: client(port_a).lpush(key, "bmv"))
    late.start()
    assert rb.blmove(key, "rc.on-b", 10, "RIGHT", "LEFT") == b"bmv"
    late.join()
    assert rb.rpop("rc.on-b") == b"bmv"
    # DEL of a's queue from b purges it there.
    ra.lpush(key, "d1", "d2")
    assert rb.delete(key) == 1
    assert ra.llen(key) == 0
    # LLEN and LRANGE of a's queue from b are asked of a, and take nothing.
    ra.lpush(key, "p1", "p2", "p3")
    assert rb.llen(key) == 3
    assert rb.lrange(key, 0, -1) == [b"p1", b"p2", b"p3"]
    assert rb.lrange(key, -2, -1) == [b"p2", b"p3"]
    assert rb.lrange(key, 5, 9) == []
    assert rb.llen(key) == 3, "a peek took something"
    try:
        rb.lrange(key, 0, 20000)
    except redis.ResponseError as e:
        raise AssertionError(f"a short list's long range was refused: {e}")
    assert rb.delete(key) == 1
    assert rb.llen(key) == 0
    # The connection is still usable.
    assert rb.ping()

    # Pub/sub across nodes: a subscriber on b hears PUBLISH on a (once a
    # has heard of the subscription: until then PUBLISH counts 0).
    sub = rb.pubsub()
    sub.subscribe("rc.news")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    deadline = time.monotonic() + 10
    while ra.publish("rc.news", "hello") != 1:
        assert time.monotonic() < deadline, "a never reached b's subscriber"
        time.sleep(0.05)
    m = sub.get_message(timeout=5)
    assert m and m["type"] == "message" and m["data"] == b"hello", m
    # And a pattern on a hears b.
    psub = ra.pubsub()
    psub.psubscribe("rc.*")
    assert psub.get_message(timeout=5)["type"] == "psubscribe"
    deadline = time.monotonic() + 10
    while rb.publish("rc.sports", "goal") != 1:
        assert time.monotonic() < deadline, "b never reached a's pattern"
        time.sleep(0.05)
    m = psub.get_message(timeout=5)
    assert m and m["type"] == "pmessage" and m["data"] == b"goal", m
    print("ok")


def push(port, key, first, end):
    r = client(port)
    acked, retried = [], []
    for i in range(int(first), int(end)):
        body = str(i)
        deadline = time.monotonic() + 60
        while True:
            try:
                r.lpush(key, body)
                acked.append(body)
                break
            except (redis.ResponseError, redis.ConnectionError, redis.TimeoutError):
                # Not stored, or not known to be: tried again (it may then
                # be there twice, never lost).
                if not retried or retried[-1] != body:
                    retried.append(body)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                if not isinstance(sys.exc_info()[1], redis.ResponseError):
                    r = client(port)
    print(json.dumps({"acked": acked, "retried": retried}))


def drain(port, key):
    r = client(port)
    got = []
    while True:
        m = r.brpop(key, timeout=5)
        if m is None:
            break
        got.append(m[1].decode())
    print(json.dumps(got))


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "across":
        across(*sys.argv[2:4])
    elif what == "push":
        push(*sys.argv[2:6])
    elif what == "drain":
        drain(*sys.argv[2:4])
    else:
        raise SystemExit(f"unknown: {what}")
