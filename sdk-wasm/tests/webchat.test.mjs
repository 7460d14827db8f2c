// The chat example (examples/web-chat), served by its documented command,
// with two users in headless Chromium against the real `ferry` server; a
// screenshot with both present, and assertions on what the page shows.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { statSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { FerryServer } from './lib/server.mjs';
import { launch, watch } from './lib/browser.mjs';
import { figure, outDir } from './lib/figures.mjs';

const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const WAIT = 20000;

function serveChat() {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(repo, 'examples/web-chat/serve.mjs'), '--port', '0'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const timer = setTimeout(() => reject(new Error('serve.mjs did not start')), WAIT);
    createInterface({ input: child.stdout }).once('line', (line) => {
      clearTimeout(timer);
      const m = /(http:\/\/127\.0\.0\.1:\d+\/)/.exec(line);
      m ? resolve({ url: m[1], child }) : reject(new Error(`unexpected output: ${line}`));
    });
    child.once('exit', (code) => reject(new Error(`serve.mjs exited with ${code}`)));
  });
}

async function joinAs(browser, base, server, nick) {
  const ctx = await browser.newContext({ viewport: { width: 900, height: 560 } });
  const page = watch(await ctx.newPage(), nick);
  await page.goto(`${base}?server=${encodeURIComponent(server)}`);
  await page.fill('#nick', nick);
  await page.click('#join');
  await page.waitForSelector('#status.connected', { timeout: WAIT });
  return { ctx, page };
}

const texts = (page) =>
  page.$$eval('#messages li', (lis) => lis.map((li) => `${li.querySelector('.nick').textContent}: ${li.querySelector('.text').textContent}`));
const online = (page) => page.$$eval('#online li', (lis) => lis.map((li) => li.textContent));

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

test('web-chat example: two users, history on open, who is online, screenshot', async () => {
  const srv = await FerryServer.start();
  const chat = await serveChat();
  const browser = await launch();
  try {
    const alice = await joinAs(browser, chat.url, srv.url, 'alice');
    await say(alice.page, 'hello, anyone here?');
    await alice.page.waitForFunction(() => document.querySelectorAll('#messages li').length === 1, null, { timeout: WAIT });

    // Bob arrives later: alice's message comes from history on open.
    const bob = await joinAs(browser, chat.url, srv.url, 'bob');
    await bob.page.waitForFunction(() => document.querySelectorAll('#messages li').length === 1, null, { timeout: WAIT });
    assert.deepEqual(await texts(bob.page), ['alice: hello, anyone here?']);
    await say(bob.page, 'hi alice!');

    for (const p of [alice.page, bob.page]) {
      await p.waitForFunction(() => document.querySelectorAll('#messages li').length === 2, null, { timeout: WAIT });
      await p.waitForFunction(() => document.querySelectorAll('#online li').length === 2, null, { timeout: WAIT });
      assert.deepEqual(await texts(p), ['alice: hello, anyone here?', 'bob: hi alice!']);
      assert.deepEqual(await online(p), ['alice', 'bob']);
      assert.equal(await p.textContent('#online-count'), '2');
      assert.equal(await p.textContent('#status'), 'connected');
    }

    const shot = join(outDir, 'web-chat.png');
    await alice.page.screenshot({ path: shot });
    const png = readFileSync(shot);
    assert.equal(png.subarray(1, 4).toString(), 'PNG');
    assert.ok(statSync(shot).size > 5000, 'a real rendering, not a blank page');
    figure('web-chat screenshot', shot);

    // Bob leaves: alice's list follows (after the server's presence grace).
    await bob.ctx.close();
    await alice.page.waitForFunction(() => document.querySelectorAll('#online li').length === 1, null, { timeout: WAIT });
    assert.deepEqual(await online(alice.page), ['alice']);
    await alice.ctx.close();
  } finally {
    await browser.close();
    chat.child.kill();
    await srv.stop();
  }
});
