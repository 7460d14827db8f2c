// Entry for Node: reads the package's one ferry_wasm_bg.wasm from disk and
// instantiates it synchronously on first use (Node's fetch cannot load
// file: URLs). Node >= 22 has a global WebSocket; Node 20 needs
// --experimental-websocket, or pass `transport: webSocketTransport(WS)`.
import { readFileSync } from 'node:fs';
import * as glue from '../ferry_wasm.js';
import { _setGlueLoader } from '../ferry.js';

_setGlueLoader(() => {
  glue.initSync({ module: readFileSync(new URL('../ferry_wasm_bg.wasm', import.meta.url)) });
  return glue;
});

export * from '../ferry.js';
