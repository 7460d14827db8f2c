// Entry for Node (wasm-pack --target nodejs, which loads the .wasm
// synchronously). Node >= 22 has a global WebSocket; Node 20 needs
// --experimental-websocket, or pass `transport: webSocketTransport(WS)`.
import { createRequire } from 'node:module';
import { _setGlueLoader } from '../ferry.js';

const require = createRequire(import.meta.url);
_setGlueLoader(() => require('./ferry_wasm.js'));

export * from '../ferry.js';
