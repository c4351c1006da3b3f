// amqplib's stream example flows (examples/stream_queues in its package:
// send_stream.js, then receive_stream.js with each offset form its
// comments list) against a running broker. Run by
// tests/tests/integration/streams.rs as
//   node streams.mjs AMQP_URL
// and prints "ok", or throws.
import { createRequire } from "node:module";
const require = createRequire(process.env.WASMQ_NODE_MODULES + "/");
const amqp = require("amqplib");

const url = process.argv[2];
const queue = "my_first_stream";
const declare = {
  exclusive: false,
  durable: true,
  autoDelete: false,
  arguments: { "x-queue-type": "stream", "x-max-length-bytes": 2_000_000_000 },
};

// send_stream.js, ten times.
const connection = await amqp.connect(url);
const sender = await connection.createConfirmChannel();
await sender.assertQueue(queue, declare);
for (let i = 0; i < 10; i++) {
  sender.sendToQueue(queue, Buffer.from(`Hello World! ${i}`));
}
await sender.waitForConfirms();
await sender.close();

// receive_stream.js: qos, manual acks, an x-stream-offset.
async function receive(offset, n) {
  const channel = await connection.createChannel();
  await channel.assertQueue(queue, declare);
  await channel.qos(100);
  const got = [];
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${got.length} of ${n} for ${JSON.stringify(offset)}`)), 10000);
    channel.consume(queue, (msg) => {
      got.push([msg.properties.headers["x-stream-offset"], msg.content.toString()]);
      channel.ack(msg);
      if (got.length === n) {
        clearTimeout(timer);
        resolve();
      }
    }, { noAck: false, arguments: { "x-stream-offset": offset } });
  });
  await channel.close();
  return got;
}

const check = (cond, what) => { if (!cond) throw new Error(what); };
const first = await receive("first", 10);
check(first[0][0] === 0 && first[9][1] === "Hello World! 9", `first: ${JSON.stringify(first)}`);
const five = await receive(5, 5);
check(five[0][0] === 5, `offset 5: ${JSON.stringify(five)}`);
const last = await receive("last", 1);
check(last[0][0] === 9, `last: ${JSON.stringify(last)}`);
const since = await receive({ "!": "timestamp", value: Math.floor(Date.now() / 1000) - 3600 }, 10);
check(since[0][0] === 0, `timestamp: ${JSON.stringify(since)}`);
const hour = await receive("1h", 10);
check(hour[0][0] === 0, `interval: ${JSON.stringify(hour)}`);
await connection.close();
console.log("ok");
