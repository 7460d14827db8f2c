// Headless Chromium (Debian's /usr/bin/chromium) driven by playwright-core.
import { chromium } from 'playwright-core';

const ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // Containers often have a tiny /dev/shm.
  '--disable-dev-shm-usage',
];

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ARGS,
  });
}

/** Forward page console errors and uncaught exceptions to the test output. */
export function watch(page, name) {
  page.on('pageerror', (e) => console.log(`[${name}] page error: ${e.message}`));
  page.on('console', (m) => {
    // Refused connections are expected while a test has the server down.
    if (m.text().includes('ERR_CONNECTION_REFUSED')) return;
    if (m.type() === 'error' || m.type() === 'warning') console.log(`[${name}] console.${m.type()}: ${m.text()}`);
  });
  return page;
}
