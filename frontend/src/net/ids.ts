/**
 * Random hex ids (32 chars, like a uuid4 without dashes): conversation ids and client_ids.
 * `crypto.randomUUID` exists only in secure contexts (https, localhost); getRandomValues works
 * on a plain-http LAN address too.
 */
export function randomHex(bytes = 16): string {
  const buf = new Uint8Array(bytes);
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c && typeof c.getRandomValues === "function") {
    c.getRandomValues(buf);
  } else {
    for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
  }
  let out = "";
  for (const b of buf) out += b.toString(16).padStart(2, "0");
  return out;
}

export const newConversationId = (): string => randomHex(16);
export const newClientId = (): string => randomHex(12);
