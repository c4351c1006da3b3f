#!/usr/bin/env python3
# Failover of a quorum queue on the cluster started by ./scripts/cluster.sh
# (WASMQ_CLUSTER_DIR, default target/cluster): a publisher on a follower
# publishes with confirms, one at a time; the queue's leader is killed with
# SIGKILL; the time from the kill to the first confirm of a message
# published after it (from the new leader) is printed; the killed node is
# restarted and the next round begins. Usage:
#   python3 perf/quorum_failover.py ROUNDS
# (needs pika; ./scripts/test.sh installs it in target/pika-venv).
# WASMQ_BIN=path restarts nodes with that broker (as scripts/cluster.sh).
import base64, json, os, subprocess, sys, time, urllib.request
import pika

root = os.environ.get("WASMQ_CLUSTER_DIR", "target/cluster")
ports = {"a": (5672, 15672), "b": (5673, 15673), "c": (5674, 15674)}
QUEUE = "failover"

def api(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    return json.load(urllib.request.urlopen(req, timeout=2))

def leader():
    for n, (_, adm) in ports.items():
        try:
            for q in api(adm, "/api/queues/%2F"):
                if q["name"] == QUEUE and q.get("quorum", {}).get("leader"):
                    return q["quorum"]["leader"]
        except Exception:
            pass
    return None

conn = pika.BlockingConnection(pika.ConnectionParameters(port=5672))
conn.channel().queue_declare(queue=QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
conn.close()
results = []
for round in range(int(sys.argv[1])):
    while leader() is None:
        time.sleep(0.2)
    l = leader()
    follower = next(n for n in ports if n != l)
    conn = pika.BlockingConnection(pika.ConnectionParameters(port=ports[follower][0]))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", QUEUE, b"before")
    pid = subprocess.check_output(["pgrep", "-f", f"{root}/{l}/wasmq.toml"]).split()[0].decode()
    t0 = time.time()
    subprocess.run(["kill", "-9", pid])
    while time.time() - t0 < 30:
        try:
            ch.basic_publish("", QUEUE, b"after")
            break
        except pika.exceptions.NackError:
            time.sleep(0.01)
        except Exception:
            time.sleep(0.05)
            try:
                conn = pika.BlockingConnection(pika.ConnectionParameters(port=ports[follower][0]))
                ch = conn.channel()
                ch.confirm_delivery()
            except Exception:
                pass
    dt = time.time() - t0
    results.append(dt)
    print(f"round {round}: leader {l} killed; first confirm through {follower} after {dt*1000:.0f} ms", flush=True)
    conn.close()
    subprocess.Popen([os.environ.get("WASMQ_BIN", "target/release/wasmq"), "serve", "--config", f"{root}/{l}/wasmq.toml"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(5)
print("failover ms:", sorted(int(r * 1000) for r in results))
