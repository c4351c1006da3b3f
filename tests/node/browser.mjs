// What the web UI scripts share: Debian's Chromium launched headless
// through playwright-core (from WASMQ_NODE_MODULES, which scripts/test.sh
// installs), and a page that collects every JavaScript error, console
// error and unexpected dialog into `errors`.
import { createRequire } from "node:module";
const require = createRequire(process.env.WASMQ_NODE_MODULES + "/");
const { chromium } = require("playwright-core");

export async function launch() {
  return chromium.launch({
    executablePath: process.env.WASMQ_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}

// A 1280x800 page whose errors land in `errors`. A browser's own login
// dialog would hang the page, so there must be none; the UI's own
// confirmations (purge, delete) are accepted when `confirms` is set.
export async function watchedPage(browser, errors, confirms) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && errors.push(`console: ${m.text()}`));
  page.on("dialog", (d) => {
    if (confirms && d.type() === "confirm") return d.accept();
    errors.push(`dialog: ${d.message()}`);
    d.dismiss();
  });
  return page;
}
