// Measured figures: printed as they come and appended to tests/out/figures.txt,
// which test.sh prints as a summary at the end.
import { appendFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const out = join(dirname(fileURLToPath(import.meta.url)), '..', 'out');

export function figure(name, value) {
  const line = `${name}: ${value}`;
  console.log(`FIGURE ${line}`);
  mkdirSync(out, { recursive: true });
  appendFileSync(join(out, 'figures.txt'), `${line}\n`);
}

export const outDir = out;
