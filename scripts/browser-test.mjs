// The dashboard in a real (headless) Chromium against a running job: the checkpoint history
// fills with completed checkpoints, the job graph shows every vertex of the job, the savepoint
// button takes a savepoint, and the page throws no error. Run by scripts/browser-test.sh, which starts the job.
//   node scripts/browser-test.mjs <dashboard url>
// Environment: WEIR_BROWSER_DEPS (the folder with node_modules/playwright-core), CHROMIUM
// (default /usr/bin/chromium), WEIR_JOB_PID (SIGTERMed at the end), WEIR_REST_TOKEN_FILE (default
// ~/.weir/rest-<port>.token, where the job writes it), SCREENSHOT (default docs/dashboard.png),
// OUT_DIR (a second copy of the screenshot).
import { createRequire } from 'node:module';
import { copyFileSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const url = process.argv[2];
if (!url) {
  console.error('usage: node scripts/browser-test.mjs <dashboard url>');
  process.exit(2);
}
const deps = process.env.WEIR_BROWSER_DEPS;
if (!deps) {
  console.error('WEIR_BROWSER_DEPS is not set (scripts/browser-test.sh sets it)');
  process.exit(2);
}
// An ES module ignores NODE_PATH: resolve playwright-core from the deps folder instead.
const { chromium } = createRequire(path.join(deps, 'package.json'))('playwright-core');
const screenshot = process.env.SCREENSHOT || 'docs/dashboard.png';
const timeoutMs = 60_000;

const consoleLines = [];
const pageErrors = [];
let browser;
let failed = false;

function fail(message) {
  console.error(`browser test FAILED: ${message}`);
  failed = true;
}

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Root in a container has no user namespaces for the sandbox.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
  await page.goto(url, { waitUntil: 'load', timeout: timeoutMs });

  // Two completed checkpoints: polling, the history table and the job's checkpointing all work.
  const completed = '#checkpoint-history tbody tr[data-status="COMPLETED"]';
  try {
    await page.waitForFunction((sel) => document.querySelectorAll(sel).length >= 2, completed, { timeout: timeoutMs, polling: 200 });
  } catch (e) {
    const rows = await page.$$eval('#checkpoint-history tbody tr[data-status]', (rs) => rs.map((r) => `${r.dataset.checkpointId}:${r.dataset.status}`));
    const live = await page.textContent('#live-text');
    throw new Error(`fewer than two COMPLETED rows in #checkpoint-history after ${timeoutMs / 1000} s ` +
      `(rows: ${rows.join(' ') || 'none'}; live indicator: ${live}): ${e.message}`);
  }
  const ids = await page.$$eval(completed, (rows) => rows.map((r) => Number(r.dataset.checkpointId)));
  if (ids.some((id) => !Number.isInteger(id) || id <= 0)) fail(`checkpoint rows with bad ids: ${ids}`);
  console.log(`completed checkpoints in the table: ${ids.join(', ')}`);

  // The job graph has a box for every vertex the REST API lists, under the vertex's id.
  const overview = await (await fetch(new URL('/jobs/overview', url))).json();
  const job = await (await fetch(new URL(`/jobs/${overview.jobs[0].jid}`, url))).json();
  if (!job.vertices || job.vertices.length === 0) fail('the REST API lists no vertices');
  const shown = await page.$$eval('#job-graph [data-vertex-id]', (gs) => gs.map((g) => g.dataset.vertexId));
  for (const v of job.vertices || []) {
    if (!shown.includes(v.id)) fail(`vertex ${v.id} (${v.name}) is not in the job graph`);
  }
  console.log(`job graph: ${shown.length} vertices (${(job.vertices || []).map((v) => v.name).join(' → ')})`);
  const stateBadge = (await page.textContent('#job-state')).trim();
  if (stateBadge !== 'RUNNING') fail(`state badge says ${stateBadge}, not RUNNING`);
  const live = (await page.textContent('#live-text')).trim();
  if (live !== 'live') fail(`live indicator says "${live}"`);

  // "Trigger savepoint" through the page: the token prompt, the POST with the bearer token, the
  // trigger's status, and the savepoint in the history table and on disk.
  const port = new URL(url).port;
  const tokenFile = process.env.WEIR_REST_TOKEN_FILE || path.join(os.homedir(), '.weir', `rest-${port}.token`);
  const token = readFileSync(tokenFile, 'utf8').trim();
  page.on('dialog', (d) => d.accept(d.type() === 'prompt' ? token : undefined));
  await page.click('#btn-savepoint');
  await page.waitForFunction(() => /completed|failed|refused/.test(document.getElementById('action-status').textContent),
    null, { timeout: timeoutMs, polling: 200 });
  const outcome = (await page.textContent('#action-status')).trim();
  console.log(`savepoint button: ${outcome}`);
  const m = /^Savepoint completed: (.+)$/.exec(outcome);
  if (!m) fail(`the savepoint did not complete: ${outcome}`);
  else if (!existsSync(m[1])) fail(`the savepoint's location ${m[1]} does not exist`);
  const savepointRow = '#checkpoint-history tbody tr[data-status="COMPLETED"].savepoint';
  await page.waitForSelector(savepointRow, { timeout: timeoutMs });

  // Let the rates and the chart fill for one more poll before the picture.
  await page.waitForTimeout(1500);
  mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);
  if (process.env.OUT_DIR) {
    mkdirSync(process.env.OUT_DIR, { recursive: true });
    copyFileSync(screenshot, path.join(process.env.OUT_DIR, 'dashboard.png'));
  }
  if (pageErrors.length) fail(`the page threw:\n${pageErrors.join('\n')}`);
} catch (e) {
  fail(e && e.message ? e.message : String(e));
} finally {
  if (browser) await browser.close().catch(() => {});
  if (process.env.WEIR_JOB_PID) {
    try { process.kill(Number(process.env.WEIR_JOB_PID), 'SIGTERM'); } catch (e) { fail(`stopping the job: ${e.message}`); }
  }
}

if (failed) {
  console.error(`--- the page's console (${consoleLines.length} lines) ---`);
  for (const l of consoleLines) console.error(l);
  for (const e of pageErrors) console.error(`[pageerror] ${e}`);
  process.exit(1);
}
console.log('browser test passed');
