// Payloads `publish` sends (bytes as they are, JSON values as JSON text)
// must compile; payload-reject.ts holds the ones that must not.
import { FerryClient, encodePayload, type JsonValue, type PayloadInput } from '@ferry/client';

declare const client: FerryClient;

void client.publish('c', 'text');
void client.publish('c', 42);
void client.publish('c', true);
void client.publish('c', null);
void client.publish('c', [1, 'two', null, { three: 3 }]);
void client.publish('c', new Uint8Array([1, 2]));
void client.publish('c', new ArrayBuffer(4));
void client.publish('c', new DataView(new ArrayBuffer(4)));
void client.publish('c', new Float32Array(2));
void client.publish('c', new Date());
void client.publish('c', { at: new Date(), tags: ['a'] as const });

// Interfaces and optional (left out when undefined) properties.
interface ChatMessage {
  text: string;
  replyTo?: number;
  mentions: readonly string[];
  meta: { edited: boolean } | null;
}
declare const msg: ChatMessage;
void client.publish('c', msg);
void client.publish('c', { text: 'x', replyTo: undefined, mentions: [], meta: null } satisfies ChatMessage);

// The annotation types.
declare const json: JsonValue;
declare const any: PayloadInput;
void client.publish('c', json);
void client.publish('c', any);
const bytes: Uint8Array = encodePayload({ ok: 1 });
void bytes;
