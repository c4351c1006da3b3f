// node-redis, unchanged, against wasmq's RESP front end, with amqplib on
// the same broker. Run by tests/tests/integration/redis.rs as
//   node redis.mjs REDIS_URL AMQP_URL
// and prints "ok", or throws.
import assert from "node:assert/strict";
import { createRequire } from "node:module";
const require = createRequire(process.env.WASMQ_NODE_MODULES + "/");
const { createClient } = require("redis");
const amqp = require("amqplib");

const [redisUrl, amqpUrl] = process.argv.slice(2);

const client = createClient({ url: redisUrl });
client.on("error", (e) => {
  throw e;
});
await client.connect();
assert.equal(await client.ping(), "PONG");

// Lists as FIFO queues.
assert.equal(await client.lPush("node.jobs", ["a", "b"]), 2);
assert.equal(await client.lLen("node.jobs"), 2);
assert.equal(await client.rPop("node.jobs"), "a");
assert.equal(await client.rPop("node.jobs"), "b");
assert.equal(await client.rPop("node.jobs"), null);

// A blocked pop on a second connection is woken by a push.
const blocker = client.duplicate();
await blocker.connect();
const waiting = blocker.brPop(["node.wait"], 5);
await new Promise((r) => setTimeout(r, 200));
await client.lPush("node.wait", "woken");
assert.deepEqual(await waiting, { key: "node.wait", element: "woken" });
assert.equal(await blocker.brPop(["node.wait"], 0.2), null);

// Many pipelined pushes (node-redis pipelines every command it is given
// at once), answered in order.
const pushes = [];
for (let i = 0; i < 500; i++) pushes.push(client.rPush("node.bulk", `m${i}`));
const lengths = await Promise.all(pushes);
assert.equal(lengths[lengths.length - 1], 500);
assert.equal(await client.lPop("node.bulk"), "m0");

// Pub/sub, both ways with AMQP.
const subscriber = client.duplicate();
await subscriber.connect();
const heard = [];
await subscriber.subscribe("node.chat", (message, channel) => heard.push([channel, message]));
await subscriber.pSubscribe("node.*", (message, channel) => heard.push(["p:" + channel, message]));
assert.equal(await client.publish("node.chat", "hello"), 2);

const conn = await amqp.connect(amqpUrl);
const ch = await conn.createConfirmChannel();
ch.publish("amq.topic", "node.chat", Buffer.from("from amqp"));
await ch.waitForConfirms();
// A push over RESP is a message an AMQP consumer gets.
await client.lPush("node.to-amqp", "for amqp");
const got = await ch.get("node.to-amqp", { noAck: true });
assert.equal(got.content.toString(), "for amqp");

const deadline = Date.now() + 3000;
while (heard.length < 4 && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 20));
}
assert.deepEqual(heard.sort(), [
  ["node.chat", "from amqp"],
  ["node.chat", "hello"],
  ["p:node.chat", "from amqp"],
  ["p:node.chat", "hello"],
]);

await subscriber.quit();
await blocker.quit();
await client.quit();
await conn.close();
console.log("ok");
