// Entry for bundlers that import .wasm as an ES module (wasm-pack --target
// bundler: webpack 5 asyncWebAssembly, vite-plugin-wasm, ...).
import * as glue from './ferry_wasm.js';
import { _setGlueLoader } from '../ferry.js';

_setGlueLoader(() => glue);

export * from '../ferry.js';
