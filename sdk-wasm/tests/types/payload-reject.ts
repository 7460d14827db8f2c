// Payloads `publish` cannot send must not compile: each `@ts-expect-error`
// line below has to be an error, or tsc fails ("unused directive"), so this
// file fails the build if the payload types become too loose again.
import { FerryClient, encodePayload } from '@ferry/client';

declare const client: FerryClient;

// @ts-expect-error a function is not JSON (JSON.stringify gives undefined)
void client.publish('c', () => 1);
// @ts-expect-error a symbol is not JSON
void client.publish('c', Symbol('s'));
// @ts-expect-error undefined is not JSON
void client.publish('c', undefined);
// @ts-expect-error bigint makes JSON.stringify throw
void client.publish('c', 10n);
// @ts-expect-error nested: a function property
void client.publish('c', { text: 'hi', onSend: () => {} });
// @ts-expect-error nested: a bigint deep inside
void client.publish('c', { a: [{ b: 1n }] });
// @ts-expect-error an array element that is undefined (JSON writes null)
void client.publish('c', [1, undefined]);
// @ts-expect-error a Map (JSON writes {}, losing every entry)
void client.publish('c', new Map([['k', 1]]));
// @ts-expect-error a Set (JSON writes {})
void client.publish('c', new Set([1]));
// @ts-expect-error an unknown value: narrow or annotate it first
void client.publish('c', JSON.parse('1') as unknown);
// @ts-expect-error encodePayload takes the same payloads
encodePayload(() => 1);

interface WithMethod {
  text: string;
  render(): string;
}
declare const withMethod: WithMethod;
// @ts-expect-error an object with a method (JSON drops it silently)
void client.publish('c', withMethod);
