// Compiles against the published declarations (test.sh runs tsc on it):
// the README's quick start, typed, plus the adapter interfaces.
import {
  FerryClient,
  FerryError,
  initFerry,
  indexedDbStorage,
  miniProgramTransport,
  type Publication,
  type PublishAck,
  type StorageAdapter,
  type Transport,
} from '@ferry/client';

initFerry('/assets/ferry_wasm_bg.wasm');

const client = new FerryClient('wss://chat.example.com/ws', {
  getToken: async () => (await fetch('/token')).text(),
  deviceId: 'laptop-1',
  storage: indexedDbStorage(),
});
const stop: () => void = client.on('state', (s) => console.log(s.state, s.delayMs ?? 0));
client.on('error', (e: FerryError) => console.warn(e.code, e.serverCode));

const sub = client.subscribe('chat:lobby', {
  qos: 2,
  onPublication: (p: Publication) => console.log(p.offset, p.json<{ text: string }>().text),
  onJoin: (who) => console.log(`${who.user} joined`),
  onGap: (g) => console.log(g.reason, g.to.offset),
});
// A setup error (no WebSocket here) rejects connect() with code 'config'.
client.connect().catch((e: FerryError) => {
  if (e.code === 'config') console.error('no transport:', e.message);
});

async function send(): Promise<number> {
  try {
    const ack: PublishAck = await client.publish('chat:lobby', { text: 'hi' }, { qos: 1 });
    const bytes = await client.publish('chat:lobby', new Uint8Array([1, 2, 3]));
    const h = await client.history('chat:lobby', { limit: 20, reverse: true });
    const who = await client.presence('chat:lobby');
    const stats = await client.presenceStats('chat:lobby');
    return ack.offset + bytes.offset + h.publications.length + who.length + stats.users;
  } catch (e) {
    if (e instanceof FerryError && e.code === 'outbox_full') return -1;
    throw e;
  }
}
void send();
sub.unsubscribe();
stop();

// Adapters are plain objects.
const memory = new Map<string, string>();
const custom: StorageAdapter = { load: (k) => memory.get(k), save: (k, v) => void memory.set(k, v) };
declare const wx: Parameters<typeof miniProgramTransport>[0];
const t: Transport = miniProgramTransport(wx);
new FerryClient('ws://127.0.0.1:8000/ws', { token: 'bob', storage: custom, transport: t, encoding: 'json' }).close();
// Several nodes of one cluster; a fixed seed replays the choice of the first.
const many = new FerryClient(['wss://a.example/ws', 'wss://b.example/ws'] as const, { seed: 7 });
const firstUrl: string = many.urls[0] ?? many.url;
void firstUrl;
many.close();
