// Entry for bundlers (webpack 5, Vite, Rollup, Parcel, esbuild with a URL
// plugin): the glue names the package's one ferry_wasm_bg.wasm as
// `new URL('ferry_wasm_bg.wasm', import.meta.url)`, which bundlers turn into
// an emitted asset and its final URL. No experimental wasm-ESM integration
// is needed, so the same .wasm serves the web and Node entries too.
import init, * as glue from '../ferry_wasm.js';
import { _setGlueLoader } from '../ferry.js';

_setGlueLoader(async () => {
  await init();
  return glue;
});

export * from '../ferry.js';
