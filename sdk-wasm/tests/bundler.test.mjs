// The bundler build (wasm-pack --target bundler) imports its .wasm as an
// ES module, the contract webpack/vite implement; Node implements it too
// behind --experimental-wasm-modules, which test.sh passes. A round trip
// against the real server proves the build links and runs.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { FerryServer } from './lib/server.mjs';
import { FerryClient } from '../pkg/bundler/index.js';

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
  } finally {
    c.close();
    await srv.stop();
  }
});
