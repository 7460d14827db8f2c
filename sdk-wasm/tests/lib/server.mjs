// The real `ferry` server as a child process on an ephemeral loopback port:
// start, kill -9, restart on the same port and data directory.
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const STARTUP_MS = 15000;
const REBIND_ATTEMPTS = 50;

// Test settings: fast heartbeats (so dead links are noticed quickly), a
// short presence grace, join/leave on, no admission limits (every client
// here comes from 127.0.0.1).
const CONFIG = `presence_grace_ms = 300

[limits]
ping_interval_ms = 1000
pong_timeout_ms = 1000
publish_rate = 0
max_connections_per_user = 0
connections_per_ip_per_minute = 0

[namespaces.default]
history_size = 100000
join_leave = true

[namespaces.chat]
history_size = 1000
join_leave = true
`;

// The server reads FERRY_* variables as configuration: pass none of ours.
function serverEnv() {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('FERRY_')));
  env.FERRY_LOG = process.env.FERRY_LOG ?? 'warn';
  return env;
}

export function ferryBin() {
  const bin = process.env.FERRY_BIN;
  if (!bin) throw new Error('FERRY_BIN must name the ferry binary (test.sh sets it)');
  return bin;
}

export class FerryServer {
  constructor(extraToml = '') {
    this.dir = mkdtempSync(join(tmpdir(), 'ferry-wasm-test-'));
    this.config = join(this.dir, 'ferry.toml');
    writeFileSync(this.config, CONFIG + extraToml);
    this.data = join(this.dir, 'data');
    this.child = null;
    this.port = 0;
    this.stderr = '';
  }

  /** Start on an ephemeral port; `extraToml` is appended to the test configuration. */
  static async start(extraToml = '') {
    const s = new FerryServer(extraToml);
    await s._launch(0);
    return s;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  _launch(port) {
    return new Promise((resolve, reject) => {
      const child = spawn(
        ferryBin(),
        ['serve', '--config', this.config, '--listen', `127.0.0.1:${port}`, '--data-dir', this.data, '--api-listen', 'off'],
        { stdio: ['ignore', 'pipe', 'pipe'], env: serverEnv() },
      );
      let done = false;
      const finish = (err, p) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) {
          child.kill('SIGKILL');
          reject(err);
        } else {
          this.child = child;
          this.port = p;
          resolve();
        }
      };
      const timer = setTimeout(() => finish(new Error(`ferry did not start in ${STARTUP_MS} ms: ${this.stderr}`)), STARTUP_MS);
      child.stderr.on('data', (d) => {
        if (this.stderr.length < 4000) this.stderr += d;
      });
      const lines = createInterface({ input: child.stdout });
      lines.once('line', (line) => {
        const m = /ws:\/\/127\.0\.0\.1:(\d+)\/ws/.exec(line);
        if (m) finish(null, Number(m[1]));
        else finish(new Error(`unexpected first line from ferry: ${line}`));
      });
      child.once('exit', (code) => finish(new Error(`ferry exited with ${code}: ${this.stderr}`)));
    });
  }

  /** kill -9: no shutdown, no close frames. */
  async kill9() {
    const c = this.child;
    if (!c) return;
    this.child = null;
    const exited = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await exited;
  }

  /** Start again on the same port and data directory (retrying while the port is still held). */
  async restart() {
    await this.kill9();
    let last;
    for (let i = 0; i < REBIND_ATTEMPTS; i++) {
      try {
        await this._launch(this.port);
        return;
      } catch (e) {
        last = e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    throw last;
  }

  async stop() {
    await this.kill9();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
