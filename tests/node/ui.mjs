// Drives the web UI in Debian's Chromium (headless, through playwright-core)
// against a running broker: log in, see the queue, exchange and plugin the
// Rust test made, and check that no page logs a JavaScript error. Saves a
// screenshot of each page. Run by tests/tests/integration/ui.rs as
//   node ui.mjs ADMIN_URL USER PASSWORD QUEUE EXCHANGE SCREENSHOT_DIR
// and prints "ok", or throws.
import { launch, watchedPage } from "./browser.mjs";

const [url, user, password, queue, exchange, shots, candidate] = process.argv.slice(2);
const browser = await launch();
const errors = [];
try {
  // Only the UI's own confirmations (purge, delete) are expected, and
  // accepted.
  const page = await watchedPage(browser, errors, true);

  await page.goto(url + "/");
  // A wrong password is refused in the form, without a browser dialog.
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", "wrong");
  await page.click("button[type=submit]");
  await page.waitForSelector("#login-error:has-text('Wrong username or password')");
  // That refusal is the one failed request the browser may report.
  errors.splice(0, errors.length, ...errors.filter((e) => !e.includes("status of 401")));
  // The password is never kept by the page's storage.
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.waitForSelector("h1:has-text('Overview')");
  await page.waitForSelector(".card:has-text('Queues')");
  if (await page.isVisible("form#login")) throw new Error("the login form is still shown");
  const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
  if (stored.includes(password)) throw new Error("the password is in the page's storage");
  await page.waitForSelector("td:has-text('wasmq@localhost')"); // the node, alone
  // The four rates RabbitMQ's overview charts, confirmed included.
  for (const rate of ["published", "delivered", "acked", "confirmed"]) await page.waitForSelector(`.legend .${rate}`);
  await page.waitForTimeout(2500); // a second sample for the rate chart
  await page.screenshot({ path: `${shots}/overview.png` });

  await page.click("a[href='#queues']");
  await page.waitForSelector(`td:has-text('${queue}')`);
  const cells = await page.$$eval(`tr:has(td:has-text('${queue}')) td`, (tds) => tds.map((t) => t.textContent));
  // Name, vhost, type, ready, ...
  if (cells[2] !== "classic" || cells[3] !== "3") throw new Error(`queue row without its type and 3 ready messages: ${cells}`);
  // Total, and the rates once a second refresh gives them (5th to 7th columns).
  if (cells[5] !== "3") throw new Error(`queue row without its total: ${cells}`);
  await page.waitForFunction((q) => {
    const row = [...document.querySelectorAll("tr")].find((tr) => tr.textContent.includes(q));
    const tds = row ? [...row.querySelectorAll("td")].map((t) => t.textContent) : [];
    return /^[0-9]+\.[0-9]$/.test(tds[6] || "") && /^[0-9]+\.[0-9]$/.test(tds[7] || "");
  }, queue, { timeout: 10000 });
  await page.screenshot({ path: `${shots}/queues.png` });
  // Paged by the broker: 250 more queues make three pages of 100.
  await page.waitForSelector("#qpage:has-text('page 1 of 3')");
  await page.click("#qnext");
  await page.waitForSelector("#qpage:has-text('page 2 of 3')");
  await page.click("#qprev");
  await page.waitForSelector("#qpage:has-text('page 1 of 3')");
  // Sorted by the broker: ready messages, most first, puts ours on top.
  await page.click("a.sort[data-key='messages_ready']");
  await page.waitForSelector(`#qtable tbody tr:first-child td:has-text('${queue}')`);
  await page.click("a.sort[data-key='name']");
  // Filtered by the broker; the filter holds across the 2 s refresh.
  await page.fill("#qfilter", "no-such-queue");
  await page.waitForSelector(`td:has-text('${queue}')`, { state: "detached" });
  await page.waitForSelector("#qpage:has-text('(0 of ')");
  await page.waitForTimeout(2500);
  if (await page.isVisible(`td:has-text('${queue}')`)) throw new Error("a refresh dropped the filter");
  await page.fill("#qfilter", "");
  await page.waitForSelector(`td:has-text('${queue}')`);

  // The queue's own page: its figures and binding; peek, publish, purge.
  await page.click(`a:has-text('${queue}')`);
  await page.waitForSelector("#qdetail .card:has-text('Ready') b:text-is('3')");
  await page.waitForSelector(`#qdetail td:has-text('${exchange}')`);
  await page.click("#qget button");
  await page.waitForSelector("#qgot td:has-text('x')");
  await page.screenshot({ path: `${shots}/queue.png` });
  await page.fill("#qpub input[name=payload]", "from the ui");
  await page.click("#qpub button");
  await page.waitForSelector("#qpubbed:has-text('Published.')");
  await page.waitForSelector("#qdetail .card:has-text('Ready') b:text-is('4')");
  await page.click("#qpurge");
  await page.waitForSelector("#qdone:has-text('Purged.')");
  await page.waitForSelector("#qdetail .card:has-text('Ready') b:text-is('0')");
  // Delete another queue from its page: back to the list, one fewer.
  await page.goto(url + "/#queue/%2F/ui.page.000");
  await page.waitForSelector("#qdelete");
  await page.click("#qdelete");
  await page.waitForSelector("#qpage");
  if (await page.isVisible("td:has-text('ui.page.000')")) throw new Error("the deleted queue is still listed");

  await page.click("a[href='#exchanges']");
  const xrow = await page.waitForSelector(`tr:has(td:has-text('${exchange}'))`);
  if (!(await xrow.textContent()).includes("topic")) throw new Error("the exchange row lacks its type");
  // A test message's way through the exchange, decided by its plugin.
  await page.click(`tr:has(td:has-text('${exchange}')) button.trace`);
  await page.fill("#trace-form input[name=key]", "o.1");
  await page.fill("#trace-form input[name=body]", "hello");
  await page.click("#trace-form button[type=submit]");
  await page.waitForSelector(`#trace-result code:has-text('${queue}')`);
  const trace = await page.textContent("#trace-result");
  if (!trace.includes("route")) throw new Error(`the trace lacks the router's step: ${trace}`);
  // It stays across the table's refresh.
  await page.waitForTimeout(2500);
  if (!(await page.isVisible("#trace-result"))) throw new Error("a refresh dropped the trace");
  await page.screenshot({ path: `${shots}/exchanges.png` });
  // The exchange's own page: its router, its bindings with their filters,
  // and the trace form.
  await page.click(`a:has-text('${exchange}')`);
  await page.waitForSelector("#xdetail .card:has-text('Router') b:has-text('topic')");
  await page.waitForSelector(`#xdetail tr:has(td:has-text('${queue}'))`);
  await page.waitForSelector("#xdetail td:text-is('ui-filter')");
  await page.fill("#trace-form input[name=key]", "o.2");
  await page.click("#trace-form button[type=submit]");
  await page.waitForSelector(`#trace-result code:has-text('${queue}')`);
  await page.screenshot({ path: `${shots}/exchange.png` });

  await page.click("a[href='#plugins']");
  const prow = await page.waitForSelector("tr:has(td:has-text('topic'))");
  if (!/[0-9a-f]{12}/.test(await prow.textContent())) throw new Error("the plugin row lacks its hash");
  // Upload a file as a new plugin: it serves, with its hash, at once.
  await page.fill("#pupload input[name=pname]", "ui-uploaded");
  await page.setInputFiles("#pupload input[type=file]", candidate);
  await page.click("#pupload button");
  await page.waitForSelector("#pupload-msg:has-text('Uploaded ui-uploaded, version ')");
  const urow = await page.waitForSelector("#plist tr:has(code:text-is('ui-uploaded'))");
  if (!/[0-9a-f]{12}/.test(await urow.textContent())) throw new Error("the uploaded plugin's row lacks its hash");
  await page.screenshot({ path: `${shots}/plugins.png` });
  // A plugin's page: stage a canary from a file, see it, abort it.
  await page.click("a:has-text('ui-filter')");
  await page.waitForSelector("#nocand");
  await page.waitForSelector("#pversions td:has-text('yes')");
  // Its circuit, p99 and self-tests beside calls and faults.
  await page.waitForSelector("#pdetail .card:has-text('Circuit') b:has-text('closed')");
  await page.waitForSelector("#pdetail .card:has-text('p99')");
  await page.waitForSelector("#pdetail .card:has-text('Self-tests passed')");
  await page.setInputFiles("#pstage input[type=file]", candidate);
  await page.selectOption("#pstage select[name=mode]", "canary");
  await page.click("#pstage button");
  await page.waitForFunction(() => document.querySelector("#pstaged").textContent !== "");
  const staged = await page.textContent("#pstaged");
  if (staged !== "Staged.") throw new Error(`staging the canary: ${staged}`);
  await page.waitForSelector("#pcand .card:has-text('Mode') b:has-text('canary 10%')");
  await page.screenshot({ path: `${shots}/plugin.png` });
  await page.click("#pcand button[data-act=abort]");
  await page.waitForSelector("#nocand");
  // Its log is live: lines written after the page opened appear without
  // a reload (the test writes "live line N" every 300 ms).
  const newest = async () => Math.max(-1, ...(await page.$$eval("#plogs td", (tds) =>
    tds.map((t) => /^live line (\d+)$/.exec(t.textContent)).filter(Boolean).map((m) => Number(m[1])))));
  const seen = await newest();
  await page.waitForFunction((n) => [...document.querySelectorAll("#plogs td")].some((t) => {
    const m = /^live line (\d+)$/.exec(t.textContent);
    return m && Number(m[1]) > n;
  }), seen, { timeout: 10000 });

  await page.click("a[href='#connections']");
  await page.waitForSelector(`td:has-text('${user}')`);
  await page.waitForSelector("h2:has-text('Channels')");
  await page.screenshot({ path: `${shots}/connections.png` });
  // Close one (the test opened a spare): one row fewer.
  const before = await page.$$eval("#connlists table:first-of-type tbody tr", (rs) => rs.length);
  await page.click("#connlists table:first-of-type tbody tr:last-child button[data-close]");
  await page.waitForSelector("#conn-msg:has-text('Closed connection')");
  await page.waitForFunction((n) => document.querySelectorAll("#connlists table:first-of-type tbody tr").length === n - 1, before);

  await page.click("a[href='#admin']");
  await page.waitForSelector(`tr:has(td:has-text('${user}')):has(td:has-text('administrator'))`);
  await page.waitForSelector("td:has-text('ui-cap')");
  // Add a user, give it permissions, add a policy; then delete both.
  await page.fill("#adduser input[name=uname]", "ui-bob");
  await page.fill("#adduser input[name=password]", "bob-secret");
  await page.fill("#adduser input[name=tags]", "management");
  await page.click("#adduser button");
  await page.waitForSelector("#admin-msg:has-text('Done: user ui-bob added')");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-bob')):has(td:has-text('management'))");
  await page.fill("#setperm input[name=user]", "ui-bob");
  await page.fill("#setperm input[name=read]", "^ui-");
  await page.click("#setperm button");
  await page.waitForSelector("#adminlists tr:has(td:has-text('ui-bob')):has(code:has-text('^ui-'))");
  await page.fill("#addpolicy input[name=pname]", "ui-ttl");
  await page.fill("#addpolicy input[name=pattern]", "^ui\\.ledger$");
  await page.fill("#addpolicy input[name=definition]", '{"message-ttl": 60000}');
  await page.click("#addpolicy button");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-ttl'))");
  // A definition the API refuses shows the reason and changes nothing.
  await page.fill("#addpolicy input[name=pname]", "ui-bad");
  await page.fill("#addpolicy input[name=definition]", '{"max-priority": 5}');
  await page.click("#addpolicy button");
  await page.waitForSelector("#admin-msg:has-text('400')");
  // That refusal is an expected failed request.
  errors.splice(0, errors.length, ...errors.filter((e) => !e.includes("status of 400")));
  // A vhost with a limit, set and cleared; a limit on the new user.
  await page.fill("#addvhost input[name=vname]", "ui-vh");
  await page.click("#addvhost button");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-vh'))");
  await page.selectOption("#setlimit select[name=on]", "vhost");
  await page.fill("#setlimit input[name=target]", "ui-vh");
  await page.selectOption("#setlimit select[name=limit]", "max-queues");
  await page.fill("#setlimit input[name=value]", "7");
  await page.click("#setlimit button");
  await page.waitForSelector("#adminlists tr:has(td:has-text('ui-vh')) code:has-text('max-queues=7')");
  await page.click("#adminlists tr:has(td:has-text('ui-vh')) button[data-del=vhost-limit]");
  await page.waitForSelector("#admin-msg:has-text('max-queues of ui-vh cleared')");
  await page.waitForSelector("code:has-text('max-queues=7')", { state: "detached" });
  await page.selectOption("#setlimit select[name=on]", "user");
  await page.fill("#setlimit input[name=target]", "ui-bob");
  await page.selectOption("#setlimit select[name=limit]", "max-connections");
  await page.fill("#setlimit input[name=value]", "3");
  await page.click("#setlimit button");
  await page.waitForSelector("#adminlists tr:has(td:has-text('ui-bob')) code:has-text('max-connections=3')");
  await page.screenshot({ path: `${shots}/admin.png` });

  // The management user sees only its vhost, and the API's refusal of
  // what only administrators read.
  await page.click("#logout");
  await page.waitForSelector("form#login:visible");
  await page.fill("input[name=username]", "ui-bob");
  await page.fill("input[name=password]", "bob-secret");
  await page.click("button[type=submit]");
  // The page the last user left (Admin), made again for this one.
  await page.waitForSelector("h1:has-text('Admin')");
  await page.waitForSelector("#adminlists h2:has-text('Virtual hosts') + table code:text-is('/')");
  if (await page.isVisible("#adminlists code:text-is('ui-vh')")) throw new Error("a management user sees a vhost it has no permissions in");
  await page.waitForSelector("#adminlists h2:has-text('User limits') + p.error");
  errors.splice(0, errors.length, ...errors.filter((e) => !e.includes("status of 403")));
  await page.click("#logout");
  await page.waitForSelector("form#login:visible");
  await page.fill("input[name=username]", user);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-bob'))");
  await page.click("#adminlists tr:has(code:has-text('ui-ttl')) button[data-del=policy]");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-ttl'))", { state: "detached" });
  await page.click("#adminlists tr:has(code:has-text('ui-bob')) button[data-del=user]");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-bob'))", { state: "detached" });
  await page.click("#adminlists tr:has(code:has-text('ui-vh')) button[data-del=vhost]");
  await page.waitForSelector("#adminlists tr:has(code:has-text('ui-vh'))", { state: "detached" });

  await page.click("#logout");
  await page.waitForSelector("form#login:visible");
} finally {
  await browser.close();
}
if (errors.length) throw new Error(errors.join("\n"));
console.log("ok");
