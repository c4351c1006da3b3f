// Drives the web UI's cluster views in Debian's Chromium (headless,
// through playwright-core) against one node of a running three-node
// cluster: the overview lists the three nodes with their state, the Raft
// leader and term, and the quorum queue's page lists its replicas and
// leader. With DOWN set, the overview must show that node not running and
// the others running. Run by engine/tests/cluster.rs as
//   node ui_cluster.mjs ADMIN_URL USER PASSWORD QUEUE SCREENSHOT_DIR TAG [DOWN]
// and prints "ok", or throws.
import { launch, watchedPage } from "./browser.mjs";

const [url, user, password, queue, shots, tag, down] = process.argv.slice(2);
const browser = await launch();
const errors = [];
try {
  const page = await watchedPage(browser, errors, false);

  await page.goto(url + "/");
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.waitForSelector("h1:has-text('Overview')");
  await page.waitForSelector("#raft");

  // The overview refreshes every 2 s; a node that died reads "no" once its
  // link closes, so the expected picture may take a few refreshes.
  const rows = () => page.$$eval("#nodes tbody tr", (trs) => trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent)));
  const want = (r) => r.length === 3 && r.every(([name, running]) => running === (name === down ? "no" : "yes"));
  let nodes = await rows();
  for (let i = 0; i < 40 && !want(nodes); i++) {
    await page.waitForTimeout(500);
    nodes = await rows();
  }
  if (!want(nodes)) throw new Error(`the nodes table is not as expected (down: ${down || "none"}): ${JSON.stringify(nodes)}`);
  const names = nodes.map((r) => r[0]).sort().join(",");
  if (names !== "a,b,c") throw new Error(`nodes ${names}`);
  const raft = await page.textContent("#raft");
  const m = raft.match(/is (\w+), leader (\S+), term (\d+)/);
  if (!m || m[2] === "none" || Number(m[3]) < 1) throw new Error(`no Raft leader and term: ${raft}`);
  const leaders = nodes.filter((r) => r[2] === "yes").map((r) => r[0]);
  if (leaders.length !== 1 || leaders[0] !== m[2]) throw new Error(`the leader column (${leaders}) is not the Raft leader (${m[2]})`);
  if (down && m[2] === down) throw new Error(`the leader is the dead node ${down}`);
  await page.screenshot({ path: `${shots}/overview-cluster-${tag}.png` });

  // The quorum queue in the list, with its type and its leader as node.
  await page.click("a[href='#queues']");
  await page.waitForSelector(`td:has-text('${queue}')`);
  const cells = await page.$$eval(`tr:has(td:has-text('${queue}')) td`, (tds) => tds.map((t) => t.textContent));
  if (cells[2] !== "quorum") throw new Error(`queue row without type quorum: ${cells}`);
  const node = cells[cells.length - 1];
  if (!["a", "b", "c"].includes(node) || node === down) throw new Error(`queue row's node '${node}' (down: ${down})`);
  // Its page: the replicas, the leader marked and the same as the list's node.
  await page.click(`a:has-text('${queue}')`);
  await page.waitForSelector("#replicas tbody tr");
  const members = await page.$$eval("#replicas tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));
  if (members.length !== 3) throw new Error(`replicas: ${members}`);
  const marked = members.filter((t) => t.endsWith("(leader)"));
  if (marked.length !== 1 || !marked[0].startsWith(node)) throw new Error(`replicas ${members}, list's node ${node}`);
  await page.screenshot({ path: `${shots}/queue-cluster-${tag}.png` });

  if (errors.length) throw new Error(errors.join("\n"));
  console.log("ok");
} finally {
  await browser.close();
}
