/**
 * `Sandbox` and what hangs off it (commands, files, terminals), `Snapshot` and `Template`.
 */

import { resolveConfig, type ConnectionOptions } from "./config.js";
import { CommandExitError, KilnError, NotFoundError, TimeoutError, errorFromResponse } from "./errors.js";
import {
  codeResult,
  execution,
  executionFromJson,
  commandResult,
  entryInfo,
  forward,
  networkJson,
  processInfo,
  sandboxEvent,
  sandboxInfo,
  sandboxMetrics,
  snapshotInfo,
  templateInfo,
  type BuildEvent,
  type CommandResult,
  type EntryInfo,
  type Execution,
  type ExecutionError,
  type Result,
  type ForkResult,
  type Forward,
  type Health,
  type NetworkPolicy,
  type OutputChunk,
  type ProcessInfo,
  type SandboxEvent,
  type SandboxInfo,
  type SandboxMetrics,
  type SandboxPage,
  type SnapshotInfo,
  type TemplateInfo,
  type WriteInfo,
} from "./models.js";
import { Reply, Transport, operations, type Call } from "./transport.js";

/** A command: a shell line (run by `/bin/sh -c`) or an argv array (run directly). */
export type Cmd = string | string[];
/** Called with each piece of output, as text. */
export type OutputCallback = (text: string) => void;

/** Milliseconds a command may run when `timeoutMs` is not given (E2B's default); 0: no limit. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 60_000;
const GRACE_MS = 30_000;

type Json = Record<string, unknown>;

const enc = encodeURIComponent;
const sandboxPath = (id: string, suffix = "") => `/v1/sandboxes/${enc(id)}${suffix}`;
const processPath = (id: string, pid: number | string, suffix: string) =>
  sandboxPath(id, `/processes/${enc(String(pid))}${suffix}`);

/** Options of a command. */
export interface RunOptions {
  /** Start it and return a handle at once instead of waiting for its exit. */
  background?: boolean;
  /** Environment on top of the sandbox's. */
  envs?: Record<string, string>;
  cwd?: string;
  /** `name`, `uid` or `uid:gid`. */
  user?: string;
  /** Kill it after this many ms (default 60 000; 0: no limit). */
  timeoutMs?: number;
  onStdout?: OutputCallback;
  onStderr?: OutputCallback;
  /** Text written to stdin, which is then closed; or `true` (background only): keep stdin
   * open for `sendStdin`. */
  stdin?: string | boolean;
  /** A name to find a background command by. */
  tag?: string;
}

function execBody(cmd: Cmd, options: RunOptions & { pty?: { rows: number; cols: number } }): Json {
  const body: Json = { command: typeof cmd === "string" ? cmd : [...cmd] };
  if (options.envs && Object.keys(options.envs).length) body.env = { ...options.envs };
  if (options.cwd !== undefined) body.cwd = options.cwd;
  if (options.user !== undefined) body.user = options.user;
  const timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
  if (timeoutMs > 0) body.timeout_ms = Math.round(timeoutMs);
  if (typeof options.stdin === "string") body.stdin = options.stdin;
  else if (options.stdin === true) body.open_stdin = true;
  if (options.background) body.background = true;
  if (options.tag !== undefined) body.tag = options.tag;
  if (options.pty) body.pty = { rows: options.pty.rows, cols: options.pty.cols };
  return body;
}

/** The request timeout for a command: its own plus a grace period, or none. */
function commandRequestTimeout(body: Json): number | null {
  return typeof body.timeout_ms === "number" ? body.timeout_ms + GRACE_MS : null;
}

/** The result, or the error a failed command throws. */
export function checked(result: CommandResult): CommandResult {
  if (result.timedOut) {
    throw new TimeoutError(
      `the command was killed when its timeout passed (stdout ${result.stdout.length} bytes, stderr ${result.stderr.length} bytes so far)`,
    );
  }
  if (result.exitCode !== 0) throw new CommandExitError(result);
  return result;
}

function decodeData(event: Json): Uint8Array {
  if (typeof event.data_b64 === "string") return new Uint8Array(Buffer.from(event.data_b64, "base64"));
  if (typeof event.data === "string") return new TextEncoder().encode(event.data);
  return new Uint8Array();
}

/** Turns a command's streamed events into callbacks and, at its exit, a result. */
export class EventCollector {
  pid: number | null = null;
  result: CommandResult | null = null;
  private readonly out: Uint8Array[] = [];
  private readonly err: Uint8Array[] = [];

  constructor(
    public onStdout?: OutputCallback,
    public onStderr?: OutputCallback,
  ) {}

  /** Takes one event; returns the output it carried, if any. */
  feed(event: Json): OutputChunk | undefined {
    switch (event.type) {
      case "start":
        this.pid = typeof event.pid === "number" ? event.pid : null;
        return undefined;
      case "stdout":
      case "stderr": {
        const data = decodeData(event);
        const chunk: OutputChunk = {
          stream: event.type,
          data,
          text: new TextDecoder().decode(data),
        };
        (event.type === "stdout" ? this.out : this.err).push(data);
        (event.type === "stdout" ? this.onStdout : this.onStderr)?.(chunk.text);
        return chunk;
      }
      case "exit": {
        const text = (parts: Uint8Array[]) => new TextDecoder().decode(Buffer.concat(parts));
        this.result = {
          exitCode: typeof event.exit_code === "number" ? event.exit_code : null,
          signal: typeof event.signal === "number" ? event.signal : null,
          stdout: text(this.out),
          stderr: text(this.err),
          truncated: false,
          timedOut: event.timed_out === true,
          durationMs: null,
        };
        return undefined;
      }
      case "error":
        throw new KilnError(`the command's stream broke: ${String(event.message)}`, {
          code: typeof event.code === "string" ? event.code : undefined,
        });
      default:
        return undefined;
    }
  }

  /** A collector for a stream that starts over (a new attach replays the output), with the
   * same callbacks. */
  restarted(): EventCollector {
    return new EventCollector(this.onStdout, this.onStderr);
  }

  finish(): CommandResult {
    if (!this.result) throw new KilnError("the command's stream ended before its exit");
    return this.result;
  }
}

function stdinCall(sandboxId: string, pid: number | string, data: string | Uint8Array, close: boolean): Call {
  const json: Json = { close };
  if (typeof data === "string") {
    if (data) json.data = data;
  } else if (data.length) {
    json.data_b64 = Buffer.from(data).toString("base64");
  }
  return { operation: "write_process_stdin", method: "POST", path: processPath(sandboxId, pid, "/stdin"), json };
}

/** A long stream (a command's output, a build) may stay open this long. */
const LONG_STREAM_MS: number | null = null;

/** A command running in a sandbox: wait for it, read its output as it comes (`for await`),
 * write its stdin, kill it. Dropping it does not stop a background command. */
export class CommandHandle {
  private events: AsyncGenerator<Json> | undefined;
  /** @internal */
  collector = new EventCollector();

  constructor(
    private readonly transport: Transport,
    private readonly sandboxId: string,
    readonly pid: number,
  ) {}

  private stream(): AsyncGenerator<Json> {
    this.events ??= this.transport.lines({
      operation: "attach_process",
      method: "GET",
      path: processPath(this.sandboxId, this.pid, "/stream"),
      timeoutMs: LONG_STREAM_MS,
    });
    return this.events;
  }

  /** Output as it arrives (output kept from before is replayed first), until the exit.
   * Stopping early closes the stream: the next iteration or wait attaches again and replays
   * from the start. */
  @operations("attach_process")
  async *[Symbol.asyncIterator](): AsyncGenerator<OutputChunk> {
    const events = this.stream();
    try {
      while (this.collector.result === null) {
        const next = await events.next();
        if (next.done) return;
        const chunk = this.collector.feed(next.value);
        if (chunk) yield chunk;
      }
    } finally {
      if (this.collector.result === null) {
        this.events = undefined;
        this.collector = this.collector.restarted();
      }
      await events.return(undefined);
    }
  }

  /** Waits for the exit; throws `CommandExitError` for a non-zero exit code and
   * `TimeoutError` when the command's timeout killed it. */
  @operations("attach_process")
  async wait(
    options: { onStdout?: OutputCallback; onStderr?: OutputCallback; onPty?: OutputCallback } = {},
  ): Promise<CommandResult> {
    if (options.onStdout || options.onPty) this.collector.onStdout = options.onStdout ?? options.onPty;
    if (options.onStderr) this.collector.onStderr = options.onStderr;
    for await (const _ of this) {
      // The collector keeps the output.
    }
    return checked(this.collector.finish());
  }

  /** Sends `signal` (default SIGKILL) to its process group; false if it is gone. */
  @operations("signal_process")
  async kill(signal = 9): Promise<boolean> {
    return new Commands(this.transport, this.sandboxId).kill(this.pid, signal);
  }

  /** Writes to its stdin (started with `stdin: true`) or terminal. */
  @operations("write_process_stdin")
  async sendStdin(data: string | Uint8Array): Promise<void> {
    await this.transport.request(stdinCall(this.sandboxId, this.pid, data, false));
  }

  /** Closes its stdin (on a terminal: sends end-of-file). */
  @operations("write_process_stdin")
  async closeStdin(): Promise<void> {
    await this.transport.request(stdinCall(this.sandboxId, this.pid, "", true));
  }
}

/** Run commands in a sandbox: `sandbox.commands`. */
export class Commands {
  constructor(
    private readonly transport: Transport,
    private readonly sandboxId: string,
  ) {}

  /**
   * Runs `cmd` (a shell line, or an argv array run directly). To completion by default:
   * resolves to the result, throws `CommandExitError` on a non-zero exit and `TimeoutError`
   * when `timeoutMs` (default 60 000, 0 for none) killed it; `onStdout`/`onStderr` get output
   * as it comes. With `background: true` resolves to a {@link CommandHandle} at once.
   */
  run(cmd: Cmd, options: RunOptions & { background: true }): Promise<CommandHandle>;
  run(cmd: Cmd, options?: RunOptions & { background?: false }): Promise<CommandResult>;
  @operations("exec_command", "exec_stream")
  async run(cmd: Cmd, options: RunOptions = {}): Promise<CommandResult | CommandHandle> {
    if (options.stdin === true && !options.background) {
      throw new TypeError("stdin: true needs background: true (write it with sendStdin)");
    }
    const body = execBody(cmd, options);
    const path = sandboxPath(this.sandboxId, "/exec");
    const timeoutMs = commandRequestTimeout(body);
    if (options.background) {
      const started = (
        await this.transport.request({ operation: "exec_command", method: "POST", path, json: body })
      ).json<Json>();
      const handle = new CommandHandle(this.transport, this.sandboxId, Number(started.pid));
      handle.collector.onStdout = options.onStdout;
      handle.collector.onStderr = options.onStderr;
      return handle;
    }
    if (!options.onStdout && !options.onStderr) {
      const reply = await this.transport.request({
        operation: "exec_command",
        method: "POST",
        path,
        json: body,
        timeoutMs,
      });
      return checked(commandResult(reply.json<Json>()));
    }
    const collector = new EventCollector(options.onStdout, options.onStderr);
    const events = this.transport.lines({
      operation: "exec_stream",
      method: "POST",
      path: `${path}/stream`,
      json: body,
      timeoutMs,
    });
    for await (const event of events) {
      collector.feed(event);
      if (collector.result) break;
    }
    return checked(collector.finish());
  }

  /** Commands started through the API: running, and recently finished. */
  @operations("list_processes")
  async list(): Promise<ProcessInfo[]> {
    const reply = await this.transport.request({
      operation: "list_processes",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/processes"),
    });
    return reply.json<Json[]>().map(processInfo);
  }

  /** A handle on a running command, by pid or tag (its output is replayed on wait). */
  @operations("list_processes")
  async connect(pid: number | string): Promise<CommandHandle> {
    if (typeof pid === "string" && !/^\d+$/.test(pid)) {
      const found = (await this.list()).find((p) => p.tag === pid);
      if (!found) throw new KilnError(`no process tagged ${JSON.stringify(pid)}`);
      return new CommandHandle(this.transport, this.sandboxId, found.pid);
    }
    return new CommandHandle(this.transport, this.sandboxId, Number(pid));
  }

  /** Sends `signal` (default SIGKILL) to a command's process group, by pid or tag; false if
   * there is no such command. */
  @operations("signal_process")
  async kill(pid: number | string, signal = 9): Promise<boolean> {
    const reply = await this.transport.request({
      operation: "signal_process",
      method: "POST",
      path: processPath(this.sandboxId, pid, "/signal"),
      json: { signal },
      allow: [404],
    });
    return reply.status !== 404;
  }

  /** Writes to a command's stdin (started with `stdin: true`). */
  @operations("write_process_stdin")
  async sendStdin(pid: number | string, data: string | Uint8Array): Promise<void> {
    await this.transport.request(stdinCall(this.sandboxId, pid, data, false));
  }

  /** Closes a command's stdin. */
  @operations("write_process_stdin")
  async closeStdin(pid: number | string): Promise<void> {
    await this.transport.request(stdinCall(this.sandboxId, pid, "", true));
  }
}

/** Options of `runCode`. */
export interface RunCodeOptions {
  /** `python` (the default and, so far, the only one). */
  language?: string;
  /** The context to run in (`default` unless given). */
  context?: string;
  envs?: Record<string, string>;
  /** Interrupt the run after this many ms (the context keeps its state). */
  timeoutMs?: number;
  onStdout?: OutputCallback;
  onStderr?: OutputCallback;
  onResult?: (result: Result) => void;
  onError?: (error: ExecutionError) => void;
}

/** Options of a terminal. */
export interface PtyOptions {
  rows?: number;
  cols?: number;
  /** What to run (default: bash, or sh where bash is missing, as a login shell). */
  cmd?: Cmd;
  envs?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** Kill it after this many ms (default 0: no limit). */
  timeoutMs?: number;
  /** Called with everything the terminal prints, as it comes. */
  onData?: OutputCallback;
}

/** Interactive terminals: `sandbox.pty`. */
export class Pty {
  static readonly DEFAULT_SHELL = "if command -v bash >/dev/null; then exec bash -il; else exec sh -il; fi";

  constructor(
    private readonly transport: Transport,
    private readonly sandboxId: string,
  ) {}

  /** Starts a shell (or `cmd`) in a terminal; read it with `handle.wait({ onPty })`, by
   * iterating the handle, or through `onData`. */
  @operations("exec_command")
  async create(options: PtyOptions = {}): Promise<CommandHandle> {
    const body = execBody(options.cmd ?? Pty.DEFAULT_SHELL, {
      background: true,
      envs: { TERM: "xterm-256color", ...options.envs },
      ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
      ...(options.user === undefined ? {} : { user: options.user }),
      timeoutMs: options.timeoutMs ?? 0,
      pty: { rows: options.rows ?? 24, cols: options.cols ?? 80 },
    });
    const started = (
      await this.transport.request({
        operation: "exec_command",
        method: "POST",
        path: sandboxPath(this.sandboxId, "/exec"),
        json: body,
      })
    ).json<Json>();
    const handle = new CommandHandle(this.transport, this.sandboxId, Number(started.pid));
    handle.collector.onStdout = options.onData;
    return handle;
  }

  /** Types into the terminal. */
  @operations("write_process_stdin")
  async sendInput(pid: number, data: string | Uint8Array): Promise<void> {
    await this.transport.request(stdinCall(this.sandboxId, pid, data, false));
  }

  /** Changes the terminal's size (the program gets SIGWINCH). */
  @operations("resize_process_terminal")
  async resize(pid: number, size: { rows: number; cols: number }): Promise<void> {
    await this.transport.request({
      operation: "resize_process_terminal",
      method: "POST",
      path: processPath(this.sandboxId, pid, "/resize"),
      json: { rows: size.rows, cols: size.cols },
    });
  }

  /** Ends the terminal's program; false if it is gone. */
  @operations("signal_process")
  async kill(pid: number): Promise<boolean> {
    return new Commands(this.transport, this.sandboxId).kill(pid);
  }
}

/** The sandbox's file system: `sandbox.files`. Paths are absolute, or relative to the
 * template's working directory. */
export class Files {
  constructor(
    private readonly transport: Transport,
    private readonly sandboxId: string,
  ) {}

  private content(path: string): Pick<Call, "path" | "params"> {
    return { path: sandboxPath(this.sandboxId, "/files/content"), params: { path } };
  }

  /** A file's contents as text (UTF-8), bytes, or a stream of pieces. */
  read(path: string, options?: { format?: "text" }): Promise<string>;
  read(path: string, options: { format: "bytes" }): Promise<Uint8Array>;
  read(path: string, options: { format: "stream" }): Promise<ReadableStream<Uint8Array>>;
  @operations("read_file")
  async read(
    path: string,
    options: { format?: "text" | "bytes" | "stream" } = {},
  ): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    const call: Call = { operation: "read_file", method: "GET", ...this.content(path) };
    if (options.format === "stream") return this.transport.stream({ ...call, timeoutMs: LONG_STREAM_MS });
    const reply = await this.transport.request(call);
    return options.format === "bytes" ? reply.body : reply.text();
  }

  /** Writes a whole file (made with its parents; replaced atomically: an interrupted upload
   * changes nothing). */
  @operations("write_file")
  async write(
    path: string,
    data: string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array>,
  ): Promise<WriteInfo> {
    let body: Uint8Array | string | ReadableStream<Uint8Array>;
    if (data instanceof ArrayBuffer) body = new Uint8Array(data);
    else if (data instanceof Blob) body = data.stream() as ReadableStream<Uint8Array>;
    else body = data;
    const reply = await this.transport.request({
      operation: "write_file",
      method: "PUT",
      ...this.content(path),
      body,
      timeoutMs: body instanceof ReadableStream ? LONG_STREAM_MS : undefined,
    });
    const written = reply.json<Json>();
    return { path: String(written.path), bytes: Number(written.bytes) };
  }

  /** A directory's entries, `depth` levels deep. */
  @operations("list_files")
  async list(path: string, options: { depth?: number } = {}): Promise<EntryInfo[]> {
    const reply = await this.transport.request({
      operation: "list_files",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/files"),
      params: { path, depth: options.depth ?? 1 },
    });
    return (reply.json<Json>().entries as Json[]).map(entryInfo);
  }

  /** One file's or directory's kind, size, mode and modification time. */
  @operations("stat_file")
  async getInfo(path: string): Promise<EntryInfo> {
    const reply = await this.transport.request({
      operation: "stat_file",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/files/stat"),
      params: { path },
    });
    return entryInfo(reply.json<Json>());
  }

  /** Whether the path exists. */
  @operations("stat_file")
  async exists(path: string): Promise<boolean> {
    try {
      await this.getInfo(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Makes a directory and its missing parents. */
  @operations("make_dir")
  async makeDir(path: string): Promise<void> {
    await this.transport.request({
      operation: "make_dir",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/files/mkdir"),
      json: { path },
    });
  }

  /** Removes a file, or a directory (its contents too with `recursive`). */
  @operations("remove_file")
  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.transport.request({
      operation: "remove_file",
      method: "DELETE",
      path: sandboxPath(this.sandboxId, "/files"),
      params: { path, recursive: options.recursive ?? false },
    });
  }

  /** Renames (moves) a file or directory. */
  @operations("rename_file")
  async rename(oldPath: string, newPath: string): Promise<void> {
    await this.transport.request({
      operation: "rename_file",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/files/rename"),
      json: { from: oldPath, to: newPath },
    });
  }
}

/** Options of `Sandbox.create`. */
export interface CreateOptions extends ConnectionOptions {
  /** Template name (the daemon's default, `python`, if absent). */
  template?: string;
  /** Time to live in ms (rounded to seconds; the daemon's default if absent). */
  timeoutMs?: number;
  metadata?: Record<string, string>;
  /** Environment for every command. */
  envs?: Record<string, string>;
  cpus?: number;
  memoryMib?: number;
  diskMib?: number;
  network?: NetworkPolicy;
  /** Ports reachable without the access token. */
  publicPorts?: boolean;
  /** A call on a paused sandbox resumes it (default true). */
  autoResume?: boolean;
  onExpiry?: "destroy" | "pause";
  /** Create from this snapshot (id or name) instead of a template. */
  snapshot?: string;
}

function createBody(options: CreateOptions): Json {
  const body: Json = {};
  if (options.template !== undefined) body.template = options.template;
  if (options.timeoutMs !== undefined) body.ttl_secs = Math.max(1, Math.round(options.timeoutMs / 1000));
  if (options.metadata) body.metadata = { ...options.metadata };
  if (options.envs) body.env = { ...options.envs };
  if (options.cpus !== undefined) body.cpus = options.cpus;
  if (options.memoryMib !== undefined) body.memory_mib = options.memoryMib;
  if (options.diskMib !== undefined) body.disk_mib = options.diskMib;
  if (options.network) body.network = networkJson(options.network);
  if (options.publicPorts !== undefined) body.ports = { public: options.publicPorts };
  if (options.autoResume !== undefined) body.auto_resume = options.autoResume;
  if (options.onExpiry !== undefined) body.on_expiry = options.onExpiry;
  if (options.snapshot !== undefined) body.snapshot = options.snapshot;
  return body;
}

function connection(options: ConnectionOptions): ConnectionOptions {
  const out: ConnectionOptions = {};
  if (options.url !== undefined) out.url = options.url;
  if (options.apiKey !== undefined) out.apiKey = options.apiKey;
  if (options.requestTimeoutMs !== undefined) out.requestTimeoutMs = options.requestTimeoutMs;
  return out;
}

/** One call on a connection of its own (the operations not bound to a sandbox). */
async function once(options: ConnectionOptions, call: Call): Promise<Reply> {
  return new Transport(resolveConfig(connection(options))).request(call);
}

function portUrlOf(info: SandboxInfo, port: number): string {
  if (!info.portUrl) throw new KilnError("this sandbox has no port URL: the daemon runs without sandbox networking");
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError("port must be between 1 and 65535");
  return info.portUrl.replace("{port}", String(port));
}

/** A sandbox: a microVM of its own. Make one with {@link Sandbox.create} (`await using`
 * destroys it at the end of the scope) or reach an existing one with {@link Sandbox.connect}. */
export class Sandbox {
  readonly commands: Commands;
  readonly files: Files;
  readonly pty: Pty;
  private current: SandboxInfo;

  private constructor(
    info: SandboxInfo,
    private readonly transport: Transport,
  ) {
    this.current = info;
    this.commands = new Commands(transport, info.sandboxId);
    this.files = new Files(transport, info.sandboxId);
    this.pty = new Pty(transport, info.sandboxId);
  }

  get sandboxId(): string {
    return this.current.sandboxId;
  }

  /** What the daemon said last (`getInfo()` asks again). */
  get info(): SandboxInfo {
    return this.current;
  }

  /** Destroys the sandbox when an `await using` scope ends. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  /** Creates a sandbox from a template (or a snapshot). The first create of a template that
   * is not built yet builds it, which takes minutes. */
  @operations("create_sandbox")
  static async create(options: CreateOptions = {}): Promise<Sandbox> {
    const transport = new Transport(resolveConfig(connection(options)));
    const reply = await transport.request({
      operation: "create_sandbox",
      method: "POST",
      path: "/v1/sandboxes",
      json: createBody(options),
    });
    return new Sandbox(sandboxInfo(reply.json<Json>()), transport);
  }

  /** An existing sandbox, by id (a paused one resumes on its first call unless its
   * `autoResume` is off). */
  @operations("get_sandbox")
  static async connect(sandboxId: string, options: ConnectionOptions = {}): Promise<Sandbox> {
    const transport = new Transport(resolveConfig(connection(options)));
    const reply = await transport.request({ operation: "get_sandbox", method: "GET", path: sandboxPath(sandboxId) });
    return new Sandbox(sandboxInfo(reply.json<Json>()), transport);
  }

  /** One page of this tenant's sandboxes, filtered by state and metadata. */
  @operations("list_sandboxes")
  static async list(
    options: ConnectionOptions & {
      state?: string;
      metadata?: Record<string, string>;
      limit?: number;
      cursor?: string;
    } = {},
  ): Promise<SandboxPage> {
    const transport = new Transport(resolveConfig(connection(options)));
    const params: Record<string, string | number | undefined> = {
      state: options.state,
      limit: options.limit,
      cursor: options.cursor,
    };
    for (const [key, value] of Object.entries(options.metadata ?? {})) params[`metadata.${key}`] = value;
    const data = (
      await transport.request({ operation: "list_sandboxes", method: "GET", path: "/v1/sandboxes", params })
    ).json<Json>();
    return {
      sandboxes: (data.sandboxes as Json[]).map(sandboxInfo),
      nextCursor: typeof data.next_cursor === "string" ? data.next_cursor : null,
    };
  }

  /** Lifecycle events of this tenant's sandboxes from now on, as they happen. */
  @operations("events")
  static async *events(options: ConnectionOptions = {}): AsyncGenerator<SandboxEvent> {
    const transport = new Transport(resolveConfig(connection(options)));
    for await (const raw of transport.lines({
      operation: "events",
      method: "GET",
      path: "/v1/events",
      timeoutMs: null,
    })) {
      yield sandboxEvent(raw);
    }
  }

  /** The daemon's health (no key needed). */
  @operations("health")
  static async health(options: ConnectionOptions = {}): Promise<Health> {
    const transport = new Transport(resolveConfig(connection(options), false));
    const data = (
      await transport.request({ operation: "health", method: "GET", path: "/v1/health", timeoutMs: 10_000 })
    ).json<Json>();
    return { status: String(data.status), version: String(data.version), accel: String(data.accel) };
  }

  /** Asks the daemon for the sandbox's current state. */
  @operations("get_sandbox")
  async getInfo(): Promise<SandboxInfo> {
    const reply = await this.transport.request({
      operation: "get_sandbox",
      method: "GET",
      path: sandboxPath(this.sandboxId),
    });
    this.current = sandboxInfo(reply.json<Json>());
    return this.current;
  }

  /** Whether it exists and runs. */
  @operations("get_sandbox")
  async isRunning(): Promise<boolean> {
    try {
      return (await this.getInfo()).state === "running";
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Destroys the sandbox; false if it was already gone. */
  @operations("delete_sandbox")
  async kill(): Promise<boolean> {
    const reply = await this.transport.request({
      operation: "delete_sandbox",
      method: "DELETE",
      path: sandboxPath(this.sandboxId),
      allow: [404],
    });
    return reply.status !== 404;
  }

  /** Sets its time to live to `timeoutMs` from now (rounded to seconds). */
  @operations("update_sandbox")
  async setTimeout(timeoutMs: number): Promise<void> {
    await this.update({ timeoutMs });
  }

  /** Changes its time to live, egress policy (at once: denied connections are cut) or pause
   * settings; what is not given stays. */
  @operations("update_sandbox")
  async update(changes: {
    timeoutMs?: number;
    network?: NetworkPolicy;
    autoResume?: boolean;
    onExpiry?: "destroy" | "pause";
  }): Promise<SandboxInfo> {
    const body: Json = {};
    if (changes.timeoutMs !== undefined) body.ttl_secs = Math.max(1, Math.round(changes.timeoutMs / 1000));
    if (changes.network) body.network = networkJson(changes.network);
    if (changes.autoResume !== undefined) body.auto_resume = changes.autoResume;
    if (changes.onExpiry !== undefined) body.on_expiry = changes.onExpiry;
    if (!Object.keys(body).length) throw new TypeError("give at least one of timeoutMs, network, autoResume, onExpiry");
    const reply = await this.transport.request({
      operation: "update_sandbox",
      method: "PATCH",
      path: sandboxPath(this.sandboxId),
      json: body,
    });
    this.current = sandboxInfo(reply.json<Json>());
    return this.current;
  }

  /** Restarts its time to live from now. */
  @operations("keepalive")
  async keepalive(): Promise<void> {
    await this.transport.request({
      operation: "keepalive",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/keepalive"),
    });
  }

  /** Pauses it: memory and state go to disk; it holds no RAM or CPU until resumed (by
   * `resume()`, or by its next call when `autoResume` is on). */
  @operations("pause_sandbox")
  async pause(): Promise<SandboxInfo> {
    const reply = await this.transport.request({
      operation: "pause_sandbox",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/pause"),
    });
    this.current = sandboxInfo(reply.json<Json>());
    return this.current;
  }

  /** Resumes a paused sandbox: same processes, memory and files. */
  @operations("resume_sandbox")
  async resume(): Promise<SandboxInfo> {
    const reply = await this.transport.request({
      operation: "resume_sandbox",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/resume"),
    });
    this.current = sandboxInfo(reply.json<Json>());
    return this.current;
  }

  /** Makes `count` (1 to 32) children that continue from this moment: its processes, memory
   * and files, each with its own id, network namespace and reseeded RNG. */
  @operations("fork_sandbox")
  async fork(count = 1, options: { metadata?: Record<string, string>; timeoutMs?: number } = {}): Promise<Sandbox[]> {
    const forked = await this.forkInfo(count, options);
    return forked.sandboxes.map((info) => new Sandbox(info, this.transport));
  }

  /** Like `fork`, resolving to the children's descriptions and the fork's cost. */
  @operations("fork_sandbox")
  async forkInfo(
    count = 1,
    options: { metadata?: Record<string, string>; timeoutMs?: number } = {},
  ): Promise<ForkResult> {
    const body: Json = { count };
    if (options.metadata) body.metadata = { ...options.metadata };
    if (options.timeoutMs !== undefined) body.ttl_secs = Math.max(1, Math.round(options.timeoutMs / 1000));
    const data = (
      await this.transport.request({
        operation: "fork_sandbox",
        method: "POST",
        path: sandboxPath(this.sandboxId, "/fork"),
        json: body,
      })
    ).json<Json>();
    return {
      sandboxes: (data.sandboxes as Json[]).map(sandboxInfo),
      parentPausedMs: Number(data.parent_paused_ms),
      bytesWritten: Number(data.bytes_written),
    };
  }

  /** Keeps its memory, device state and disk under `name` (it stops briefly and runs on);
   * `Sandbox.create({ snapshot: name })` continues from there, also after a restart. */
  @operations("create_snapshot")
  async createSnapshot(name: string): Promise<SnapshotInfo> {
    const reply = await this.transport.request({
      operation: "create_snapshot",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/snapshots"),
      json: { name },
    });
    return snapshotInfo(reply.json<Json>());
  }

  /** Forwards a port of the daemon's host to `port` of the sandbox, for what is not HTTP (a
   * database, SSH); connect to the answer's `address`. Open to anyone who reaches it; a port
   * forwarded already keeps its forward. The operator turns forwarding on (`kiln serve
   * --tcp-forward-ports`). */
  @operations("open_forward")
  async forwardPort(port: number): Promise<Forward> {
    const reply = await this.transport.request({
      operation: "open_forward",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/forwards"),
      json: { port },
    });
    return forward(reply.json<Json>());
  }

  /** Its plain TCP forwards, by port. */
  @operations("list_forwards")
  async listForwards(): Promise<Forward[]> {
    const reply = await this.transport.request({
      operation: "list_forwards",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/forwards"),
    });
    return (reply.json<Json>().forwards as Json[]).map(forward);
  }

  /** Closes the forward of `port` and the connections it carries. */
  @operations("close_forward")
  async closeForward(port: number): Promise<void> {
    await this.transport.request({
      operation: "close_forward",
      method: "DELETE",
      path: sandboxPath(this.sandboxId, `/forwards/${port}`),
    });
  }

  /** Kills every process in the sandbox but its agent (what was started, what that started,
   * a fork bomb too) and returns how many; the sandbox stays usable. */
  @operations("kill_all_processes")
  async killAllProcesses(): Promise<number> {
    const reply = await this.transport.request({
      operation: "kill_all_processes",
      method: "POST",
      path: sandboxPath(this.sandboxId, "/processes/kill"),
    });
    return Number(reply.json<{ killed: number }>().killed);
  }

  /** What it uses now (CPU time, memory, disk, network bytes), measured on the host; a paused
   * sandbox is not resumed. */
  @operations("get_sandbox_metrics")
  async getMetrics(): Promise<SandboxMetrics> {
    const reply = await this.transport.request({
      operation: "get_sandbox_metrics",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/metrics"),
    });
    return sandboxMetrics(reply.json<Json>());
  }

  /** The end of its console log (the guest kernel's and init's output). */
  @operations("console_log")
  async logs(options: { lines?: number } = {}): Promise<string> {
    const reply = await this.transport.request({
      operation: "console_log",
      method: "GET",
      path: sandboxPath(this.sandboxId, "/logs"),
      params: { lines: options.lines },
    });
    return reply.text();
  }

  /**
   * Runs `code` in the sandbox's code interpreter (the `python` template has one): variables
   * and imports persist between runs of a `context` (`default` unless given). Resolves to what
   * it printed, the value of its last expression and what it displayed (figures as PNG), with
   * the exception it raised in `error` (not thrown). `timeoutMs` interrupts a runaway run,
   * keeping the context; callbacks get output and results as they come.
   */
  @operations("run_code", "run_code_stream")
  async runCode(code: string, options: RunCodeOptions = {}): Promise<Execution> {
    const body: Json = { code, language: options.language ?? "python" };
    if (options.context !== undefined) body.context = options.context;
    if (options.envs) body.env = { ...options.envs };
    if (options.timeoutMs) body.timeout_ms = Math.round(options.timeoutMs);
    const timeoutMs = options.timeoutMs ? options.timeoutMs + GRACE_MS : null;
    const streamed = options.onStdout || options.onStderr || options.onResult || options.onError;
    const path = sandboxPath(this.sandboxId, "/code");
    if (!streamed) {
      const reply = await this.transport.request({
        operation: "run_code",
        method: "POST",
        path,
        json: body,
        timeoutMs,
      });
      return executionFromJson(reply.json<Json>());
    }
    const collected: Omit<Execution, "text" | "executionCount" | "timedOut"> = {
      results: [],
      logs: { stdout: [], stderr: [] },
      error: null,
      truncated: false,
    };
    const call: Call = { operation: "run_code_stream", method: "POST", path: `${path}/stream`, json: body, timeoutMs };
    for await (const event of this.transport.lines(call)) {
      switch (event.type) {
        case "stdout":
        case "stderr": {
          const text = String(event.text ?? "");
          collected.logs[event.type].push(text);
          (event.type === "stdout" ? options.onStdout : options.onStderr)?.(text);
          break;
        }
        case "display":
        case "result": {
          const result = codeResult({ ...((event.data ?? {}) as Record<string, unknown>) }, event.type === "result");
          collected.results.push(result);
          options.onResult?.(result);
          break;
        }
        case "error":
          collected.error = {
            name: String(event.name),
            value: String(event.value),
            traceback: String(event.traceback),
          };
          options.onError?.(collected.error);
          break;
        case "done":
          return execution({
            ...collected,
            executionCount: typeof event.execution_count === "number" ? event.execution_count : 0,
            timedOut: event.timed_out === true,
          });
        case "failure":
          throw new KilnError(`the code's stream broke: ${String(event.message)}`, { code: String(event.code) });
      }
    }
    throw new KilnError("the code's stream ended before the run did");
  }

  /** A new code context (globals of its own); resolves to its id. */
  @operations("create_code_context")
  async createCodeContext(): Promise<string> {
    const path = sandboxPath(this.sandboxId, "/code/contexts");
    return String(
      (await this.transport.request({ operation: "create_code_context", method: "POST", path })).json<Json>().id,
    );
  }

  /** The ids of the sandbox's code contexts (`default` among them). */
  @operations("list_code_contexts")
  async listCodeContexts(): Promise<string[]> {
    const path = sandboxPath(this.sandboxId, "/code/contexts");
    const data = (await this.transport.request({ operation: "list_code_contexts", method: "GET", path })).json<Json>();
    return (data.contexts as unknown[]).map(String);
  }

  /** Deletes a code context and its state; false if there was none. */
  @operations("delete_code_context")
  async deleteCodeContext(context: string): Promise<boolean> {
    const path = sandboxPath(this.sandboxId, `/code/contexts/${enc(context)}`);
    const reply = await this.transport.request({
      operation: "delete_code_context",
      method: "DELETE",
      path,
      allow: [404],
    });
    if (reply.status !== 404) return true;
    // A missing context is `false`; a missing sandbox is an error.
    const error = errorFromResponse(reply.status, reply.text(), reply.headers);
    if (!error.message.startsWith("code context")) throw error;
    return false;
  }

  /** Interrupts the run going on in `context` (it ends with a `KeyboardInterrupt` error; the
   * context keeps its state); false if none was running. */
  @operations("interrupt_code")
  async interruptCode(context = "default"): Promise<boolean> {
    const path = sandboxPath(this.sandboxId, `/code/contexts/${enc(context)}/interrupt`);
    return (
      (await this.transport.request({ operation: "interrupt_code", method: "POST", path })).json<Json>().running ===
      true
    );
  }

  /** The host name that serves `port` of the sandbox: `<port>-<id>.<domain>`. */
  getHost(port: number): string {
    return new URL(portUrlOf(this.current, port)).host;
  }

  /** The URL of `port` (send `info.accessToken` as `X-Kiln-Access-Token` unless its ports
   * are public). */
  getPortUrl(port: number): string {
    return portUrlOf(this.current, port);
  }
}

/** Snapshots of this tenant. */
export class Snapshot {
  @operations("list_snapshots")
  static async list(options: ConnectionOptions = {}): Promise<SnapshotInfo[]> {
    const data = (
      await once(options, { operation: "list_snapshots", method: "GET", path: "/v1/snapshots" })
    ).json<Json>();
    return (data.snapshots as Json[]).map(snapshotInfo);
  }

  /** A snapshot by id or name. */
  @operations("get_snapshot")
  static async get(snapshot: string, options: ConnectionOptions = {}): Promise<SnapshotInfo> {
    const reply = await once(options, {
      operation: "get_snapshot",
      method: "GET",
      path: `/v1/snapshots/${enc(snapshot)}`,
    });
    return snapshotInfo(reply.json<Json>());
  }

  /** Deletes a snapshot; false if there was none. `ConflictError` while sandboxes made from
   * it exist (the message lists them). */
  @operations("delete_snapshot")
  static async delete(snapshot: string, options: ConnectionOptions = {}): Promise<boolean> {
    const reply = await once(options, {
      operation: "delete_snapshot",
      method: "DELETE",
      path: `/v1/snapshots/${enc(snapshot)}`,
      allow: [404],
    });
    return reply.status !== 404;
  }
}

/** Templates sandboxes are made from: the daemon's (`base`, `python`) and this tenant's. */
export class Template {
  @operations("list_templates")
  static async list(options: ConnectionOptions = {}): Promise<TemplateInfo[]> {
    const data = (
      await once(options, { operation: "list_templates", method: "GET", path: "/v1/templates" })
    ).json<Json>();
    return (data.templates as Json[]).map(templateInfo);
  }

  @operations("get_template")
  static async get(name: string, options: ConnectionOptions = {}): Promise<TemplateInfo> {
    const reply = await once(options, { operation: "get_template", method: "GET", path: `/v1/templates/${enc(name)}` });
    return templateInfo(reply.json<Json>());
  }

  /** Builds a template of this tenant from `spec` (TOML, as in `templates/*\/template.toml`),
   * or builds an existing one by `name` now; progress goes to `onEvent`. */
  @operations("build_template")
  static async build(
    options: ConnectionOptions & { spec?: string; name?: string; onEvent?: (event: BuildEvent) => void },
  ): Promise<TemplateInfo> {
    if ((options.spec === undefined) === (options.name === undefined)) {
      throw new TypeError("give spec (a new template) or name (an existing one)");
    }
    const transport = new Transport(resolveConfig(connection(options)));
    const json = options.spec !== undefined ? { spec: options.spec } : { name: options.name };
    for await (const raw of transport.lines({
      operation: "build_template",
      method: "POST",
      path: "/v1/templates",
      json,
      timeoutMs: null,
    })) {
      const event: BuildEvent = { type: String(raw.type), raw };
      options.onEvent?.(event);
      if (event.type === "ready") return templateInfo(raw.template as Json);
      if (event.type === "error") {
        throw new KilnError(`building the template failed: ${String(raw.message)}`, {
          code: String(raw.code ?? "build_failed"),
        });
      }
    }
    throw new KilnError("the template build stream ended without a result");
  }

  /** Deletes one of this tenant's templates; false if there was none. */
  @operations("delete_template")
  static async delete(name: string, options: ConnectionOptions = {}): Promise<boolean> {
    const reply = await once(options, {
      operation: "delete_template",
      method: "DELETE",
      path: `/v1/templates/${enc(name)}`,
      allow: [404],
    });
    return reply.status !== 404;
  }
}
