// The bundler entry (`@ferry/client/bundler`): the glue names the package's
// one ferry_wasm_bg.wasm as `new URL('ferry_wasm_bg.wasm', import.meta.url)`,
// the pattern webpack 5, Vite, Rollup and Parcel turn into an emitted asset
// whose URL they then fetch. Here Node plays the bundled app: its fetch
// cannot read file: URLs, so a fetch that serves them from disk stands in
// for the bundler's asset URL. The test checks that the entry asks for
// exactly that one file, and a round trip against the real server proves
// the build links and runs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';

import { FerryServer } from './lib/server.mjs';

const wasmUrl = new URL('../pkg/ferry_wasm_bg.wasm', import.meta.url).href;
const fetched = [];
const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const url = new URL(input instanceof Request ? input.url : String(input));
  if (url.protocol !== 'file:') return realFetch(input, init);
  fetched.push(url.href);
  return new Response(await readFile(url), { headers: { 'content-type': 'application/wasm' } });
};
const { FerryClient } = await import('../pkg/bundler/index.js');

test('bundler build: subscribe, publish, receive', async () => {
  const srv = await FerryServer.start();
  const c = new FerryClient(srv.url, { token: 'bundled' });
  try {
    const got = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no publication')), 20000);
      c.subscribe('b', {
        qos: 1,
        onSubscribed: () => c.publish('b', { hello: 'bundler' }, { qos: 1 }).catch(reject),
        onPublication: (p) => {
          clearTimeout(timer);
          resolve(p);
        },
      });
    });
    c.connect();
    const p = await got;
    assert.deepEqual(p.json(), { hello: 'bundler' });
    assert.equal(p.offset, 1);
    assert.equal(p.publisher.user, 'bundled');
    assert.deepEqual(fetched, [wasmUrl], 'the bundler entry loads the one shared .wasm, once');
  } finally {
    c.close();
    await srv.stop();
  }
});
