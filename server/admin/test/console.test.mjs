// The admin console in headless Chromium against the real `ferry` binary
// on an ephemeral loopback port, with a real client speaking the JSON
// protocol (docs/PROTOCOL.md): a wrong password shows nothing, the right
// one shows the client, the console publishes to it, pages history and
// disconnects it. Screenshots go to $ADMIN_TEST_OUT (default ./out).
//
//   FERRY_BIN=target/debug/ferry node --experimental-websocket console.test.mjs
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const OUT = process.env.ADMIN_TEST_OUT ?? join(here, 'out');
const FERRY_BIN = process.env.FERRY_BIN;
const PASSWORD = 'correct horse battery staple';
const CHANNEL = 'chat:lobby';
const SEEDED = 25;
const STEP_MS = 15000;
const WHOLE_TEST_MS = 120000;

if (!FERRY_BIN) throw new Error('set FERRY_BIN to the ferry binary');
if (typeof WebSocket !== 'function') throw new Error('no global WebSocket: run node with --experimental-websocket');

const cleanups = [];
async function cleanup() {
  while (cleanups.length) {
    try {
      await cleanups.pop()();
    } catch (e) {
      console.log('cleanup:', e.message);
    }
  }
}
const watchdog = setTimeout(async () => {
  console.error(`FAIL: the test did not finish in ${WHOLE_TEST_MS / 1000} s`);
  await cleanup();
  process.exit(1);
}, WHOLE_TEST_MS);

function withTimeout(promise, ms, what) {
  let t;
  const timeout = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(t));
}

/** Start `ferry serve` with an admin password; resolves to its address. */
async function startServer() {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-admin-test-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'ferry.toml');
  writeFileSync(
    config,
    `[admin]
password = "${PASSWORD}"

[limits]
publish_rate = 0
connections_per_ip_per_minute = 0
`,
  );
  const child = spawn(
    FERRY_BIN,
    ['serve', '--config', config, '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'data'), '--api-listen', 'off'],
    { env: { ...process.env, FERRY_LOG: 'warn', FERRY_ENV_IGNORE: 'FERRY_BIN' }, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  cleanups.push(async () => {
    if (child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await withTimeout(exited, 10000, 'ferry to stop');
    }
  });
  const lines = createInterface({ input: child.stdout });
  const first = new Promise((resolve, reject) => {
    lines.once('line', resolve);
    child.once('exit', (code) => reject(new Error(`ferry exited with ${code} before listening`)));
  });
  const line = await withTimeout(first, 15000, 'the ferry startup line');
  // Keep reading so the server never blocks on a full pipe.
  lines.on('line', () => {});
  const addr = /ws:\/\/([^/]+)\/ws/.exec(line)?.[1];
  assert.ok(addr, `no address in ${JSON.stringify(line)}`);
  return addr;
}

/** A minimal client of the JSON protocol, QoS 0, anonymous dev tokens. */
class JsonClient {
  constructor(url, user, device) {
    this.received = [];
    this.closeCode = null;
    this.waiters = [];
    this.replies = new Map();
    this.nextId = 1;
    this.ws = new WebSocket(url, 'ferry.v1.json');
    this.ws.addEventListener('open', () => {
      this.send({
        request: {
          id: this.nextId++,
          cmd: {
            connect: {
              version: 1, token: user, device_id: device,
              client: { name: 'admin-console-test', version: '1' }, subs: [{ channel: CHANNEL, qos: 0 }],
            },
          },
        },
      });
    });
    this.ws.addEventListener('message', (ev) => this.onMessage(ev.data));
    this.ws.addEventListener('close', (ev) => {
      this.closeCode = ev.code;
      this.check();
    });
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  onMessage(text) {
    for (const line of String(text).split('\n')) {
      if (!line.trim()) continue;
      const f = JSON.parse(line);
      if (f.push === 'ping') this.ws.send('"pong"');
      else if (f.push?.publication) {
        const p = f.push.publication;
        this.received.push({ offset: p.offset, data: Buffer.from(p.payload.data, 'base64').toString('utf8') });
      } else if (f.reply) {
        this.replies.set(f.reply.id, f.reply.outcome);
        if (f.reply.outcome.ok?.connected) this.client = f.reply.outcome.ok.connected.client;
      }
    }
    this.check();
  }

  check() {
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred()) return true;
      w.resolve();
      return false;
    });
  }

  /** Resolves when `pred` holds, checked on every frame and on close. */
  until(pred, what) {
    if (pred()) return Promise.resolve();
    return withTimeout(new Promise((resolve) => this.waiters.push({ pred, resolve })), STEP_MS, what);
  }

  async publish(data) {
    const id = this.nextId++;
    const payload = { data: Buffer.from(JSON.stringify(data)).toString('base64') };
    this.send({ request: { id, cmd: { publish: { channel: CHANNEL, message_id: `seed-${id}`, qos: 1, payload } } } });
    await this.until(() => this.replies.has(id), `reply to publish ${id}`);
    assert.ok(this.replies.get(id).ok?.published, JSON.stringify(this.replies.get(id)));
  }
}

const shots = [];
async function shot(page, name) {
  const path = join(OUT, name);
  await page.screenshot({ path, fullPage: true });
  shots.push(path);
}

async function historyOffsets(page) {
  return page.$$eval('#history tbody tr[data-offset]', (rows) => rows.map((r) => Number(r.dataset.offset)));
}

/** Wait until the history table shows exactly `want` (newest first). */
async function expectHistory(page, want) {
  await page.waitForFunction(
    (w) => JSON.stringify([...document.querySelectorAll('#history tbody tr[data-offset]')].map((r) => Number(r.dataset.offset))) === w,
    JSON.stringify(want),
    { timeout: STEP_MS },
  );
  assert.deepEqual(await historyOffsets(page), want);
}

const range = (hi, lo) => Array.from({ length: hi - lo + 1 }, (_, i) => hi - i);

async function main() {
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  const addr = await startServer();
  const base = `http://${addr}`;

  const client = new JsonClient(`ws://${addr}/ws`, 'alice', 'laptop-1');
  await client.until(() => client.client, 'the client to connect');
  for (let i = 1; i <= SEEDED; i++) await client.publish({ seed: i });

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  cleanups.push(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(STEP_MS);
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // The browser logs every refused request (401) as a console error.
    if (m.type() === 'error' && !m.text().includes('401')) problems.push(`console: ${m.text()}`);
  });

  // 1. Wrong password: an error, and nothing of the server's data.
  await page.goto(`${base}/admin`);
  await page.waitForSelector('#login-view:not([hidden])');
  await shot(page, '01-login.png');
  await page.fill('#password', 'not the password at all');
  await page.click('#login-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('login-error').textContent === 'Wrong password.');
  assert.equal(await page.isHidden('#dash'), true, 'the dashboard stays hidden');
  const shown = await page.evaluate(() => document.body.innerText);
  for (const secret of ['alice', 'laptop-1', CHANNEL]) {
    assert.ok(!shown.includes(secret), `${secret} shown before login`);
  }
  const status = await page.evaluate(() => fetch('/admin/api/connections').then((r) => r.status));
  assert.equal(status, 401, 'the API refuses without a session');
  await shot(page, '02-wrong-password.png');
  console.log('ok: a wrong password shows nothing and the API answers 401');

  // 2. Log in: the connected test client appears.
  await page.fill('#password', PASSWORD);
  await page.click('#login-form button[type=submit]');
  const row = `#connections tr[data-client="${client.client}"]`;
  await page.waitForSelector(row);
  assert.equal(await page.textContent(`${row} td:nth-child(2)`), 'alice');
  assert.equal(await page.textContent(`${row} td:nth-child(4)`), CHANNEL);
  await page.waitForSelector(`#channels tr[data-channel="${CHANNEL}"]`);
  assert.equal(await page.textContent(`#channels tr[data-channel="${CHANNEL}"] td:nth-child(2)`), String(SEEDED));
  await page.waitForSelector('#counters .counter[data-metric="ferry_connections"]');
  // The live counters read the real series (they were all 0 once, when
  // `/metrics` gained a node label the console did not expect).
  await page.waitForFunction(
    () => document.querySelector('#counters .counter[data-metric="ferry_connections"] .v')?.textContent === '1',
    null,
    { timeout: 10000 },
  );
  assert.equal(
    await page.textContent('#counters .counter[data-metric="ferry_engine_up"] .v'),
    '1',
    'the embedded engine is up',
  );
  await shot(page, '03-dashboard.png');
  console.log(`ok: logged in; connection ${client.client} of alice listed`);

  // 3. Publish from the console; the client receives it.
  const text = 'hello from the console';
  await page.fill('#pub-channel', CHANNEL);
  await page.fill('#pub-data', JSON.stringify({ text }));
  await page.click('#publish-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('pub-result').textContent.startsWith('Published'));
  await page.waitForFunction(
    ([ch, top]) => document.querySelector(`#channels tr[data-channel="${ch}"] td:nth-child(2)`)?.textContent === top,
    [CHANNEL, String(SEEDED + 1)],
  );
  await client.until(() => client.received.some((p) => p.data === JSON.stringify({ text })), 'the console publication');
  const got = client.received.find((p) => p.data === JSON.stringify({ text }));
  assert.equal(got.offset, SEEDED + 1);
  console.log(`ok: published from the console; the client received offset ${got.offset}`);

  // 4. History, 10 per page, newest first; page back to offset 1 and forward.
  const top = SEEDED + 1;
  await page.click(`#channels tr[data-channel="${CHANNEL}"] button`);
  await expectHistory(page, range(top, top - 9));
  const newest = await page.textContent(`#history tr[data-offset="${top}"] td.data`);
  assert.equal(newest, JSON.stringify({ text }));
  await shot(page, '04-history.png');
  await page.click('#hist-older');
  await expectHistory(page, range(top - 10, top - 19));
  await page.click('#hist-older');
  await expectHistory(page, range(top - 20, 1));
  assert.equal(await page.isDisabled('#hist-older'), true, 'nothing older than offset 1');
  await shot(page, '05-history-oldest.png');
  await page.click('#hist-newer');
  await expectHistory(page, range(top - 10, top - 19));
  await page.click('#hist-newest');
  await expectHistory(page, range(top, top - 9));
  console.log('ok: history paged 26-17, 16-7, 6-1 and back');

  // 5. Disconnect the client: closed for good (3503), gone from the list.
  page.once('dialog', (d) => d.accept());
  await page.click(`${row} button`);
  await client.until(() => client.closeCode !== null, 'the client to be disconnected');
  assert.equal(client.closeCode, 3503, 'closed with "disconnected, do not reconnect"');
  await page.waitForSelector(row, { state: 'detached' });
  await page.waitForFunction(() => document.getElementById('conn-summary').textContent.startsWith('0 on this node'));
  // The server unregisters the connection as its task ends; the page
  // shows it at the next refresh.
  await page.waitForFunction(
    () => document.querySelector('#counters .counter[data-metric="ferry_connections"] .v')?.textContent === '0',
  );
  await page.waitForFunction(
    (ch) => document.querySelector(`#channels tr[data-channel="${ch}"] td:nth-child(5)`)?.textContent === '0',
    CHANNEL,
  );
  await shot(page, '06-disconnected.png');
  console.log('ok: the console disconnected the client (close 3503)');

  // 6. Log out: back to the login form, the session is dead.
  await page.click('#logout');
  await page.waitForSelector('#login-view:not([hidden])');
  const after = await page.evaluate(() => fetch('/admin/api/info').then((r) => r.status));
  assert.equal(after, 401, 'logged out: the API refuses');
  console.log('ok: logged out');

  assert.deepEqual(problems, [], 'no page errors');
  for (const p of shots) console.log(`screenshot: ${p}`);
}

try {
  await main();
  console.log('admin console test passed');
} catch (e) {
  console.error('FAIL:', e);
  process.exitCode = 1;
} finally {
  await cleanup();
  clearTimeout(watchdog);
}
