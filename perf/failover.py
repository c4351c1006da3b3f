#!/usr/bin/env python3
# Failover time of the cluster started by ./scripts/cluster.sh: kill -9 the
# leader, time a durable queue.declare on a survivor until declare-ok, then
# restart the killed node. Usage: python3 perf/failover.py ROUNDS (needs pika;
# ./scripts/test.sh installs it in target/pika-venv).
import pika, time, sys, subprocess, json, urllib.request, base64
def status(port):
    req=urllib.request.Request(f"http://127.0.0.1:{port}/api/cluster", headers={"Authorization":"Basic "+base64.b64encode(b"guest:guest").decode()})
    return json.load(urllib.request.urlopen(req, timeout=2))
ports={"a":(5672,15672),"b":(5673,15673),"c":(5674,15674)}
results=[]
for round in range(int(sys.argv[1])):
    leader=None
    for n,(amqp,adm) in ports.items():
        try:
            st=status(adm); leader=st["leader"]; break
        except Exception: pass
    other=[n for n in ports if n!=leader]
    # a channel on a survivor, opened before the kill
    conn=pika.BlockingConnection(pika.ConnectionParameters(port=ports[other[0]][0]))
    ch=conn.channel()
    pid=subprocess.check_output(["pgrep","-f",f"target/cluster/{leader}/wasmq.toml"]).split()[0].decode()
    t0=time.time()
    subprocess.run(["kill","-9",pid])
    ok=False
    while time.time()-t0<30:
        try:
            ch.queue_declare(queue=f"after-kill-{round}", durable=True); ok=True; break
        except Exception as e:
            print(f"  {time.time()-t0:.2f}s: {type(e).__name__}: {str(e)[:150]}", flush=True)
            conn=pika.BlockingConnection(pika.ConnectionParameters(port=ports[other[0]][0])); ch=conn.channel()
    dt=time.time()-t0
    results.append(dt)
    print(f"round {round}: leader {leader} killed; first committed declare on {other[0]} after {dt*1000:.0f} ms ok={ok}", flush=True)
    # restart the killed node the way cluster.sh runs it
    subprocess.Popen(["target/release/wasmq","serve","--config",f"target/cluster/{leader}/wasmq.toml"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    time.sleep(6)
print("failover ms:", sorted(int(r*1000) for r in results))
