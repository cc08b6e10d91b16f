/**
 * HTTP to the daemon with the platform's `fetch`: one request description, error mapping,
 * newline-delimited JSON streams.
 */

import type { ConnectionConfig } from "./config.js";
import { KilnError, TimeoutError, UnavailableError, errorFromResponse } from "./errors.js";

export const SDK_VERSION = "0.1.0";
/** Longest line of a newline-delimited JSON stream the SDK accepts. */
export const MAX_EVENT_LINE = 32 << 20;

export type QueryValue = string | number | boolean | null | undefined;

/** One HTTP request to the API, named by its OpenAPI `operationId`. */
export interface Call {
  operation: string;
  method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE";
  path: string;
  params?: Record<string, QueryValue>;
  json?: unknown;
  body?: Uint8Array | string | ReadableStream<Uint8Array>;
  /** Milliseconds to wait for the whole answer; null: no limit; absent: the client's. */
  timeoutMs?: number | null;
  /** Statuses returned instead of thrown (e.g. 404 for `exists`). */
  allow?: number[];
}

/** A finished response. */
export class Reply {
  constructor(
    readonly status: number,
    readonly headers: Headers,
    readonly body: Uint8Array,
  ) {}

  text(): string {
    return new TextDecoder().decode(this.body);
  }

  json<T>(): T {
    try {
      return JSON.parse(this.text()) as T;
    } catch (e) {
      throw new KilnError(`the daemon answered with invalid JSON: ${String(e)}`, { cause: e });
    }
  }
}

function transportError(call: Call, e: unknown): KilnError {
  if (e instanceof KilnError) return e;
  const name = (e as { name?: string } | null)?.name;
  if (name === "TimeoutError" || name === "AbortError") {
    return new TimeoutError(`${call.method} ${call.path} (${call.operation}) timed out`, { cause: e });
  }
  const cause = (e as { cause?: { code?: string } } | null)?.cause;
  if (cause?.code === "ECONNREFUSED" || cause?.code === "ENOTFOUND" || cause?.code === "EHOSTUNREACH") {
    return new UnavailableError(`cannot reach the kiln daemon: ${cause.code} (is \`kiln serve\` running? KILN_URL?)`, {
      cause: e,
    });
  }
  return new KilnError(`${call.method} ${call.path} failed: ${String(e)}`, { cause: e });
}

/** Parses one line of a newline-delimited JSON stream (undefined for a blank one). */
export function parseLine(line: string): Record<string, unknown> | undefined {
  const text = line.trim();
  if (!text) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new KilnError(`the daemon streamed invalid JSON: ${String(e)}`, { cause: e });
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) {
    throw new KilnError("the daemon streamed a non-object event");
  }
  return value as Record<string, unknown>;
}

/** Splits byte chunks into lines; a line longer than the limit is an error. */
export async function* splitLines(chunks: AsyncIterable<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of chunks) {
    pending += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, newline);
      pending = pending.slice(newline + 1);
    }
    if (pending.length > MAX_EVENT_LINE) {
      throw new KilnError("a streamed event was larger than the SDK accepts");
    }
  }
  pending += decoder.decode();
  if (pending) yield pending;
}

export class Transport {
  constructor(readonly config: ConnectionConfig) {}

  private url(call: Call): string {
    const url = new URL(this.config.url + call.path);
    for (const [key, value] of Object.entries(call.params ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(key, String(value));
    }
    return url.toString();
  }

  private async send(call: Call, signal: AbortSignal | undefined): Promise<Response> {
    const headers: Record<string, string> = {
      "user-agent": `kiln-sdk-typescript/${SDK_VERSION}`,
    };
    if (this.config.apiKey) headers.authorization = `Bearer ${this.config.apiKey}`;
    let body: Uint8Array | string | ReadableStream<Uint8Array> | undefined = call.body;
    if (call.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(call.json);
    }
    const init: RequestInit & { duplex?: "half" } = { method: call.method, headers, signal };
    if (body !== undefined) {
      init.body = body as NonNullable<RequestInit["body"]>;
      if (body instanceof ReadableStream) init.duplex = "half";
    }
    let response: Response;
    try {
      response = await fetch(this.url(call), init);
    } catch (e) {
      throw transportError(call, e);
    }
    if (response.status >= 400 && !(call.allow ?? []).includes(response.status)) {
      const text = await response.text().catch(() => "");
      throw errorFromResponse(response.status, text, response.headers);
    }
    return response;
  }

  private signal(call: Call): AbortSignal | undefined {
    const ms = call.timeoutMs === undefined ? this.config.requestTimeoutMs : call.timeoutMs;
    return ms === null ? undefined : AbortSignal.timeout(ms);
  }

  /** Sends a call and reads the whole answer. */
  async request(call: Call): Promise<Reply> {
    const response = await this.send(call, this.signal(call));
    try {
      return new Reply(response.status, response.headers, new Uint8Array(await response.arrayBuffer()));
    } catch (e) {
      throw transportError(call, e);
    }
  }

  /** A response body as it arrives. Cancel it (or break out of a loop over it) to close. */
  async stream(call: Call): Promise<ReadableStream<Uint8Array>> {
    const response = await this.send(call, this.signal(call));
    if (!response.body) throw new KilnError(`${call.operation}: the daemon sent no body`);
    return response.body;
  }

  /** The events of a newline-delimited JSON response, as they arrive; leaving the loop closes
   * the connection (which ends a foreground command). */
  async *lines(call: Call): AsyncGenerator<Record<string, unknown>> {
    const body = await this.stream(call);
    try {
      for await (const line of splitLines(body)) {
        const event = parseLine(line);
        if (event !== undefined) yield event;
      }
    } catch (e) {
      throw transportError(call, e);
    } finally {
      await body.cancel().catch(() => undefined);
    }
  }
}

/** Marks an SDK method with the API operations (OpenAPI `operationId`) it calls; a test
 * checks that every operation has a method. */
export function operations(...ids: string[]) {
  return function mark<T extends (...args: never[]) => unknown>(method: T, _context: ClassMethodDecoratorContext): T {
    (method as unknown as { kilnOperations: readonly string[] }).kilnOperations = ids;
    return method;
  };
}
