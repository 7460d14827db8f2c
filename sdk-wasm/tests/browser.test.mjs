// Browser end-to-end tests: the web build of the SDK in headless Chromium
// against the real `ferry` server. Run by test.sh (needs FERRY_BIN and a
// built pkg/).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { FerryServer } from './lib/server.mjs';
import { serveStatic } from './lib/static.mjs';
import { launch, watch } from './lib/browser.mjs';
import { figure } from './lib/figures.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const WAIT = 20000;

let web;
let browser;

before(async () => {
  web = await serveStatic({ '/pkg/': join(root, 'pkg'), '/tests/': join(root, 'tests/pages') });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await web?.close();
});

async function open(ctx, params, name) {
  const page = watch(await ctx.newPage(), name);
  const qs = new URLSearchParams(params).toString();
  await page.goto(`${web.url}/tests/client.html?${qs}`);
  await page.waitForFunction(() => window.rec?.ready === true, null, { timeout: WAIT });
  return page;
}

const waitState = (page, state) =>
  page.waitForFunction((s) => window.client.state === s, state, { timeout: WAIT });
const waitPubs = (page, n) =>
  page.waitForFunction((k) => window.rec.pubs.length >= k, n, { timeout: WAIT });
const waitPublished = (page) =>
  page.waitForFunction(() => window.pending.every((p) => p.done), null, { timeout: WAIT });
const rec = (page) => page.evaluate(() => window.rec);

function assertExactlyOnce(pubs, fromOffset, count, label) {
  const offsets = pubs.map((p) => p.offset);
  const want = Array.from({ length: count }, (_, i) => fromOffset + i);
  assert.deepEqual(offsets, want, `${label}: offsets in order, none lost, none repeated`);
  assert.equal(new Set(pubs.map((p) => p.messageId)).size, count, `${label}: distinct message ids`);
}

test('connect, subscribe, publish at QoS 0/1/2 and receive (binary and JSON encodings)', async () => {
  const srv = await FerryServer.start();
  const ctx = await browser.newContext();
  try {
    const a = await open(ctx, { url: srv.url, user: 'alice', qos: 2 }, 'alice');
    const b = await open(ctx, { url: srv.url, user: 'bob', qos: 1, encoding: 'json' }, 'bob');
    await waitState(a, 'connected');
    await waitState(b, 'connected');
    await a.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });
    await b.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });

    await a.evaluate(() => {
      window.publish({ n: 0, text: 'qos zero' }, 0);
      window.publish({ n: 1, text: 'qos one' }, 1);
      window.publish({ n: 2, text: 'qos two' }, 2);
      window.publish({ bytes: [0, 1, 2, 254, 255] }, 1);
    });
    // Alice's four are acknowledged before Bob publishes, so the offsets are
    // deterministic: two connections publishing at once may interleave.
    await waitPublished(a);
    // JSON-encoded client publishes too.
    await b.evaluate(() => window.publish({ n: 4, text: 'from json client' }, 2));
    await waitPublished(b);
    const acks = await a.evaluate(() => window.pending.map((p) => ({ ok: p.ok, offset: p.ack?.offset })));
    assert.ok(acks.every((x) => x.ok), `all publishes acknowledged: ${JSON.stringify(acks)}`);
    assert.deepEqual(
      acks.map((x) => x.offset),
      [1, 2, 3, 4],
      'acks carry the stored offsets',
    );

    await waitPubs(a, 5);
    await waitPubs(b, 5);
    for (const [page, label] of [
      [a, 'alice'],
      [b, 'bob'],
    ]) {
      const r = await rec(page);
      assertExactlyOnce(r.pubs, 1, 5, label);
      assert.deepEqual(r.pubs[0].body, { n: 0, text: 'qos zero' });
      assert.deepEqual(r.pubs[3].body, [0, 1, 2, 254, 255], 'binary payload arrives byte for byte');
      assert.equal(r.pubs[4].user, 'bob');
      assert.deepEqual(r.errors, []);
    }
    const history = await a.evaluate(async () => {
      const h = await window.client.history('room', { limit: 10 });
      return h.publications.map((p) => p.offset);
    });
    assert.deepEqual(history, [1, 2, 3, 4, 5]);
    figure('browser: messages exchanged (QoS 0/1/2, binary+JSON)', 5 * 2);
  } finally {
    await ctx.close();
    await srv.stop();
  }
});

test('server kill -9 and restart: reconnect, outbox delivered, nothing lost or repeated', async () => {
  const srv = await FerryServer.start();
  const ctx = await browser.newContext();
  try {
    const pub = await open(ctx, { url: srv.url, user: 'alice', device: 'pub', subscribe: '0' }, 'publisher');
    const sub = await open(ctx, { url: srv.url, user: 'bob', device: 'sub', qos: 2 }, 'subscriber');
    await waitState(pub, 'connected');
    await sub.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });

    const BEFORE = 20;
    const DURING = 20;
    await pub.evaluate((n) => {
      for (let i = 0; i < n; i++) window.publish({ i }, i % 2 ? 2 : 1);
    }, BEFORE);
    await waitPublished(pub);
    await waitPubs(sub, BEFORE);

    await srv.kill9();
    await pub.waitForFunction(() => window.client.state !== 'connected', null, { timeout: WAIT });
    await sub.waitForFunction(() => window.client.state !== 'connected', null, { timeout: WAIT });

    // Publish while the server is down: the outbox holds them.
    await pub.evaluate(
      ({ from, n }) => {
        for (let i = from; i < from + n; i++) window.publish({ i }, i % 2 ? 2 : 1);
      },
      { from: BEFORE, n: DURING },
    );
    assert.equal(await pub.evaluate(() => window.client.outbox().length), DURING, 'queued in the outbox');

    const restartStart = Date.now();
    await srv.restart();
    const serverUp = Date.now();
    const upAt = await pub.evaluate(() => performance.now());
    await waitState(pub, 'connected');
    await waitState(sub, 'connected');
    const reconnectMs = await pub.evaluate(
      (t) => window.rec.states.filter((s) => s.state === 'connected' && s.at >= t).map((s) => s.at - t)[0],
      upAt,
    );
    await waitPublished(pub);
    await waitPubs(sub, BEFORE + DURING);
    const recoveryMs = Date.now() - serverUp;

    // Backoff is capped at 1 s on these pages: a reconnect must follow within it.
    assert.ok(reconnectMs < 3000, `reconnected ${reconnectMs} ms after the server came back`);
    const outcomes = await pub.evaluate(() => window.pending.map((p) => p.ok));
    assert.ok(outcomes.every(Boolean), 'every publish acknowledged after the restart');
    assert.equal(await pub.evaluate(() => window.client.outbox().length), 0, 'outbox drained');
    const r = await rec(sub);
    assertExactlyOnce(r.pubs, 1, BEFORE + DURING, 'subscriber');
    assert.deepEqual(
      r.pubs.map((p) => p.body.i),
      Array.from({ length: BEFORE + DURING }, (_, i) => i),
      'payloads in publish order',
    );
    figure('browser restart: server restart took (ms)', serverUp - restartStart);
    figure('browser restart: page reconnect after server up (ms)', Math.round(reconnectMs));
    figure('browser restart: outbox + recovery complete after server up (ms)', recoveryMs);
    figure('browser restart: messages (before + while down)', `${BEFORE} + ${DURING}`);
  } finally {
    await ctx.close();
    await srv.stop();
  }
});

for (const storage of ['local', 'idb']) {
  test(`page reload with ${storage === 'local' ? 'localStorage' : 'IndexedDB'} storage: no loss, no duplicate`, async () => {
    const srv = await FerryServer.start();
    const pctx = await browser.newContext();
    const sctx = await browser.newContext();
    try {
      const pparams = { url: srv.url, user: 'alice', device: `pub-${storage}`, storage, subscribe: '0' };
      const sparams = { url: srv.url, user: 'bob', device: `sub-${storage}`, storage, qos: 2 };
      const pub = await open(pctx, pparams, 'publisher');
      let sub = await open(sctx, sparams, 'subscriber');
      await waitState(pub, 'connected');
      await sub.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });

      const LIVE = 5;
      const QUEUED = 10;
      await pub.evaluate((n) => {
        for (let i = 0; i < n; i++) window.publish({ i }, 2);
      }, LIVE);
      await waitPublished(pub);
      await waitPubs(sub, LIVE);
      // The subscriber's position is durable before the reload (async
      // storage commits after delivery).
      await sub.waitForFunction(() => !window.client._driver.savePending(), null, { timeout: WAIT });

      await srv.kill9();
      await pub.waitForFunction(() => window.client.state !== 'connected', null, { timeout: WAIT });
      await pub.evaluate(
        ({ from, n }) => {
          for (let i = from; i < from + n; i++) window.publish({ i }, i % 2 ? 1 : 2);
        },
        { from: LIVE, n: QUEUED },
      );
      await pub.waitForFunction((n) => window.client.outbox().length === n, QUEUED, { timeout: WAIT });
      await pub.waitForFunction(() => !window.client._driver.savePending(), null, { timeout: WAIT });

      // Reload both pages while the server is down: a fresh wasm instance
      // restores the outbox and the subscription position from storage.
      await pub.reload();
      await pub.waitForFunction(() => window.rec?.ready === true, null, { timeout: WAIT });
      assert.equal(await pub.evaluate(() => window.client.outbox().length), QUEUED, 'outbox restored after reload');
      await sub.reload();
      await sub.waitForFunction(() => window.rec?.ready === true, null, { timeout: WAIT });

      await srv.restart();
      await pub.waitForFunction((n) => window.rec.acks.length >= n, QUEUED, { timeout: WAIT });
      await waitPubs(sub, QUEUED);
      // Let any stray duplicate show up: wait until the subscriber's acks are
      // through (position saved, nothing pending), then look once more.
      await sub.waitForFunction(() => !window.client._driver.savePending(), null, { timeout: WAIT });
      const r = await rec(sub);
      assertExactlyOnce(r.pubs, LIVE + 1, QUEUED, 'subscriber after reload');
      assert.deepEqual(
        r.pubs.map((p) => p.body.i),
        Array.from({ length: QUEUED }, (_, i) => LIVE + i),
      );
      assert.equal(r.subscribed.at(-1).recovered, true, 'resubscribed with recovery, no gap');
      assert.equal(await pub.evaluate(() => window.client.outbox().length), 0);

      // The server stored each message exactly once.
      const hist = await sub.evaluate(async () =>
        (await window.client.history('room', { limit: 100 })).publications.map((p) => p.messageId),
      );
      assert.equal(hist.length, LIVE + QUEUED, 'history holds every message once');
      assert.equal(new Set(hist).size, LIVE + QUEUED);
      figure(`browser reload (${storage}): queued across reload, delivered once`, QUEUED);
    } finally {
      await pctx.close();
      await sctx.close();
      await srv.stop();
    }
  });
}

test('presence: join and leave between two pages', async () => {
  const srv = await FerryServer.start();
  const actx = await browser.newContext();
  const bctx = await browser.newContext();
  try {
    const a = await open(actx, { url: srv.url, user: 'alice', channel: 'lobby' }, 'alice');
    await a.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });
    const b = await open(bctx, { url: srv.url, user: 'bob', channel: 'lobby' }, 'bob');
    await b.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });
    await a.waitForFunction(() => window.rec.joins.includes('bob'), null, { timeout: WAIT });
    const who = await a.evaluate(async () => (await window.client.presence('lobby')).map((c) => c.user).sort());
    assert.deepEqual(who, ['alice', 'bob']);
    const stats = await b.evaluate(() => window.client.presenceStats('lobby'));
    assert.deepEqual(stats, { clients: 2, users: 2 });
    await b.close();
    await a.waitForFunction(() => window.rec.leaves.includes('bob'), null, { timeout: WAIT });
    const after = await a.evaluate(async () => (await window.client.presence('lobby')).map((c) => c.user));
    assert.deepEqual(after, ['alice']);
  } finally {
    await actx.close();
    await bctx.close();
    await srv.stop();
  }
});

test('network emulation: offline then online reconnects at once and recovers missed messages', async () => {
  const srv = await FerryServer.start();
  const pctx = await browser.newContext();
  const sctx = await browser.newContext();
  try {
    const pub = await open(pctx, { url: srv.url, user: 'alice', subscribe: '0' }, 'publisher');
    const sub = await open(sctx, { url: srv.url, user: 'bob', qos: 1 }, 'subscriber');
    await waitState(pub, 'connected');
    await sub.waitForFunction(() => window.rec.subscribed.length === 1, null, { timeout: WAIT });

    await sctx.setOffline(true);
    await waitState(sub, 'offline');
    const MISSED = 10;
    await pub.evaluate((n) => {
      for (let i = 0; i < n; i++) window.publish({ i }, 1);
    }, MISSED);
    await waitPublished(pub);
    assert.equal((await rec(sub)).pubs.length, 0, 'nothing arrives while offline');

    const t = await sub.evaluate(() => performance.now());
    await sctx.setOffline(false);
    await waitState(sub, 'connected');
    await waitPubs(sub, MISSED);
    const r = await rec(sub);
    const after = r.states.filter((s) => s.at >= t);
    const reconnectMs = after.find((s) => s.state === 'connected').at - t;
    const recoverMs = r.pubs[MISSED - 1].at - t;
    assert.ok(!after.some((s) => s.state === 'backoff'), `online reconnects without backoff: ${JSON.stringify(after)}`);
    assert.ok(reconnectMs < 1000, `reconnected ${reconnectMs} ms after coming online`);
    assertExactlyOnce(r.pubs, 1, MISSED, 'subscriber');
    figure('browser offline->online: reconnect (ms)', Math.round(reconnectMs));
    figure('browser offline->online: missed messages recovered (ms)', Math.round(recoverMs));
  } finally {
    await pctx.close();
    await sctx.close();
    await srv.stop();
  }
});

test('visibilitychange: a page coming to the foreground skips the remaining backoff', async () => {
  const srv = await FerryServer.start();
  const ctx = await browser.newContext();
  try {
    // Long backoff: without the visibility hook the page would wait 20-30 s.
    const page = await open(ctx, { url: srv.url, user: 'vis', bmin: 20000, bmax: 30000 }, 'visible');
    await waitState(page, 'connected');
    await srv.kill9();
    await waitState(page, 'backoff');
    await srv.restart();
    const t = await page.evaluate(() => performance.now());
    // The tab was in the background and comes back (the page is visible).
    await page.evaluate(() => document.dispatchEvent(new Event('visibilitychange')));
    await waitState(page, 'connected');
    const ms = (await page.evaluate(() => performance.now())) - t;
    assert.ok(ms < 5000, `reconnected ${ms} ms after becoming visible, not after the backoff`);
    figure('browser visibilitychange: reconnect during a 20 s backoff (ms)', Math.round(ms));
  } finally {
    await ctx.close();
    await srv.stop();
  }
});
