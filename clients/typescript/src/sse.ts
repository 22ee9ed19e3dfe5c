/**
 * A server-sent events reader over `fetch` (the browser's EventSource cannot send an
 * `Authorization` header, so a read token would not work with it).
 */

/** One server-sent event. */
export interface ServerSentEvent {
  /** The `event:` field ("message" when absent). */
  event: string;
  /** The `data:` lines joined by newlines. */
  data: string;
  /** The `id:` field, or undefined. */
  id: string | undefined;
}

/**
 * Parse an event stream body (WHATWG "server-sent events" section 9.2.6): yields each
 * dispatched event; comments (keep-alives) are skipped. Ends when the body ends.
 */
export async function* parseEventStream(
  body: ReadableStream<Uint8Array>,
): AsyncGenerator<ServerSentEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "";
  let data: string[] = [];
  let id: string | undefined;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      for (;;) {
        const newline = buffer.search(/\r\n|\r|\n/);
        if (newline < 0) break;
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (data.length > 0) yield { event: event || "message", data: data.join("\n"), id };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
        else if (field === "id" && !value.includes("\0")) id = value;
      }
    }
  } finally {
    await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}
