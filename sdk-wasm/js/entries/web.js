// Entry for browsers and workers: the package's one ferry_wasm_bg.wasm is
// fetched from next to the glue (new URL(..., import.meta.url)) on first
// use, or from what `initFerry` names.
import init, * as glue from '../ferry_wasm.js';
import { _setGlueLoader } from '../ferry.js';

let source;

/**
 * Where to load the WebAssembly module from (a URL, Response, BufferSource
 * or WebAssembly.Module). Optional; call before creating the first client.
 */
export function initFerry(moduleOrPath) {
  source = moduleOrPath;
}

_setGlueLoader(async () => {
  await init(source === undefined ? undefined : { module_or_path: source });
  return glue;
});

export * from '../ferry.js';
