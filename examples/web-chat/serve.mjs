#!/usr/bin/env node
// Serve the chat page and the built SDK (../../sdk-wasm/pkg) on loopback:
//   node examples/web-chat/serve.mjs [--port 8080]
// Prints the URL to open; add ?server=ws://HOST:PORT/ws for another server.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = normalize(join(here, '..', '..', 'sdk-wasm', 'pkg'));
const argPort = process.argv.indexOf('--port');
const port = argPort > 0 ? Number(process.argv[argPort + 1]) : 8080;
const types = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm' };

const server = createServer(async (req, res) => {
  const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  const [root, rel] = path.startsWith('/pkg/') ? [pkg, path.slice(5)] : [here, path.slice(1) || 'index.html'];
  const file = normalize(join(root, rel));
  if (!file.startsWith(root + sep)) return res.writeHead(403).end();
  try {
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' }).end(body);
  } catch {
    res.writeHead(404).end('not found (build the SDK first: sdk-wasm/build.sh)');
  }
});
server.listen(port, '127.0.0.1', () => {
  console.log(`web-chat on http://127.0.0.1:${server.address().port}/`);
});
