/** What the API returns, as typed values (camelCase; docs/sdk.md maps each to its field). */

export type SandboxState = "running" | "pausing" | "paused" | "resuming" | "failed";

/** A sandbox's egress policy and its limits (see docs/networking.md). */
export interface NetworkPolicy {
  internet?: boolean;
  allowOut?: string[];
  denyOut?: string[];
  /** Most bandwidth each way, in Mbit/s (absent: no limit). */
  bandwidthMbit?: number;
  /** Most connections open at once; new ones past it are refused (absent: no limit). */
  maxConnections?: number;
}

/** A sandbox's egress policy as the daemon reports it (no limit: `null`). */
export interface NetworkPolicyInfo {
  internet: boolean;
  allowOut: string[];
  denyOut: string[];
  bandwidthMbit: number | null;
  maxConnections: number | null;
}

export interface SandboxInfo {
  sandboxId: string;
  template: string;
  state: SandboxState;
  metadata: Record<string, string>;
  createdAtMs: number;
  expiresAtMs: number | null;
  ttlSecs: number | null;
  reason: string | null;
  parentId: string | null;
  autoResume: boolean;
  onExpiry: "destroy" | "pause";
  network: NetworkPolicyInfo | null;
  portsPublic: boolean;
  /** `http://{port}-<id>.<domain>/`: the URL pattern of its ports. */
  portUrl: string | null;
  /** Send as `X-Kiln-Access-Token` to reach its ports unless they are public. */
  accessToken: string | null;
}

export interface SandboxPage {
  sandboxes: SandboxInfo[];
  /** Pass as `cursor` for the next page; null on the last. */
  nextCursor: string | null;
}

export interface CommandResult {
  exitCode: number | null;
  signal: number | null;
  stdout: string;
  stderr: string;
  truncated: boolean;
  timedOut: boolean;
  durationMs: number | null;
}

export interface ProcessInfo {
  pid: number;
  tag: string | null;
  argv: string[];
  background: boolean;
  running: boolean;
  exitCode: number | null;
  signal: number | null;
}

/** A piece of a command's output (on a terminal everything arrives as stdout). */
export interface OutputChunk {
  stream: "stdout" | "stderr";
  data: Uint8Array;
  text: string;
}

export interface EntryInfo {
  path: string;
  name: string;
  kind: "file" | "dir" | "symlink" | "other";
  size: number;
  mode: number;
  modifiedMs: number;
}

export interface WriteInfo {
  path: string;
  bytes: number;
}

export interface ForkResult {
  sandboxes: SandboxInfo[];
  parentPausedMs: number;
  bytesWritten: number;
}

/** A plain TCP forward: connections to `address` (`host:port`) go to `port` of the sandbox.
 * Open to anyone who reaches that address. */
export interface Forward {
  port: number;
  address: string;
  createdAtMs: number;
}

export interface SnapshotInfo {
  snapshotId: string;
  name: string;
  sandboxId: string;
  template: string;
  sizeBytes: number;
  createdAtMs: number;
}

/** What a sandbox uses, measured on the host (`null`: not measurable now, such as CPU and
 * memory while it is paused, or network without sandbox networking). */
export interface SandboxMetrics {
  sandboxId: string;
  state: string;
  cpuSeconds: number | null;
  memoryBytes: number | null;
  memoryLimitBytes: number | null;
  diskBytes: number | null;
  networkRxBytes: number | null;
  networkTxBytes: number | null;
  measuredAtMs: number;
}

export interface TemplateInfo {
  name: string;
  description: string | null;
  vcpus: number;
  memoryMib: number;
  diskMib: number;
  ready: boolean;
  isGlobal: boolean;
}

/** Progress of a template build: `step`, `step_done`, `cached`, `ready` or `error`. */
export interface BuildEvent {
  type: string;
  raw: Record<string, unknown>;
}

/** A lifecycle event: `created`, `forked`, `paused`, `resumed`, `failed`, `destroyed`, or
 * `lagged` (some were missed: list again). */
export interface SandboxEvent {
  type: string;
  sandboxId: string | null;
  raw: Record<string, unknown>;
}

export interface Health {
  status: string;
  version: string;
  accel: string;
}

type Json = Record<string, unknown>;

const str = (v: unknown, fallback = ""): string => (v === undefined || v === null ? fallback : String(v));
const num = (v: unknown, fallback = 0): number => (typeof v === "number" ? v : fallback);
const optNum = (v: unknown): number | null => (typeof v === "number" ? v : null);
const optStr = (v: unknown): string | null => (typeof v === "string" ? v : null);

export function sandboxInfo(data: Json): SandboxInfo {
  const ports = (data.ports ?? {}) as Json;
  const network = data.network as Json | null | undefined;
  return {
    sandboxId: str(data.id),
    template: str(data.template),
    state: str(data.state, "running") as SandboxState,
    metadata: { ...((data.metadata ?? {}) as Record<string, string>) },
    createdAtMs: num(data.created_at_ms),
    expiresAtMs: optNum(data.expires_at_ms),
    ttlSecs: optNum(data.ttl_secs),
    reason: optStr(data.reason),
    parentId: optStr(data.parent_id),
    autoResume: data.auto_resume !== false,
    onExpiry: data.on_expiry === "pause" ? "pause" : "destroy",
    network: network
      ? {
          internet: network.internet !== false,
          allowOut: [...((network.allow_out ?? []) as string[])],
          denyOut: [...((network.deny_out ?? []) as string[])],
          bandwidthMbit: optNum(network.bandwidth_mbit),
          maxConnections: optNum(network.max_connections),
        }
      : null,
    portsPublic: ports.public === true,
    portUrl: optStr(ports.url),
    accessToken: optStr(ports.access_token),
  };
}

export function networkJson(policy: NetworkPolicy): Json {
  return {
    internet: policy.internet ?? true,
    allow_out: policy.allowOut ?? [],
    deny_out: policy.denyOut ?? [],
    ...(policy.bandwidthMbit === undefined ? {} : { bandwidth_mbit: policy.bandwidthMbit }),
    ...(policy.maxConnections === undefined ? {} : { max_connections: policy.maxConnections }),
  };
}

export function commandResult(data: Json): CommandResult {
  return {
    exitCode: optNum(data.exit_code),
    signal: optNum(data.signal),
    stdout: str(data.stdout),
    stderr: str(data.stderr),
    truncated: data.truncated === true,
    timedOut: data.timed_out === true,
    durationMs: optNum(data.duration_ms),
  };
}

export function processInfo(data: Json): ProcessInfo {
  return {
    pid: num(data.pid),
    tag: optStr(data.tag),
    argv: [...((data.argv ?? []) as string[])],
    background: data.background === true,
    running: data.running === true,
    exitCode: optNum(data.exit_code),
    signal: optNum(data.signal),
  };
}

export function entryInfo(data: Json): EntryInfo {
  const path = str(data.path);
  return {
    path,
    name: path.replace(/\/+$/, "").split("/").pop() ?? path,
    kind: str(data.kind, "other") as EntryInfo["kind"],
    size: num(data.size),
    mode: num(data.mode),
    modifiedMs: num(data.modified_ms),
  };
}

export function forward(data: Json): Forward {
  return {
    port: num(data.port),
    address: str(data.address),
    createdAtMs: num(data.created_at_ms),
  };
}

export function snapshotInfo(data: Json): SnapshotInfo {
  return {
    snapshotId: str(data.id),
    name: str(data.name),
    sandboxId: str(data.sandbox_id),
    template: str(data.template),
    sizeBytes: num(data.size_bytes),
    createdAtMs: num(data.created_at_ms),
  };
}

export function sandboxMetrics(data: Json): SandboxMetrics {
  return {
    sandboxId: str(data.sandbox_id),
    state: str(data.state),
    cpuSeconds: optNum(data.cpu_seconds),
    memoryBytes: optNum(data.memory_bytes),
    memoryLimitBytes: optNum(data.memory_limit_bytes),
    diskBytes: optNum(data.disk_bytes),
    networkRxBytes: optNum(data.network_rx_bytes),
    networkTxBytes: optNum(data.network_tx_bytes),
    measuredAtMs: num(data.measured_at_ms),
  };
}

export function templateInfo(data: Json): TemplateInfo {
  return {
    name: str(data.name),
    description: optStr(data.description),
    vcpus: num(data.vcpus, 1),
    memoryMib: num(data.memory_mib),
    diskMib: num(data.disk_mib),
    ready: data.ready === true,
    isGlobal: data.global === true,
  };
}

export function sandboxEvent(data: Json): SandboxEvent {
  const id = data.sandbox_id ?? data.id;
  return {
    type: str(data.type ?? data.event),
    sandboxId: id === undefined || id === null ? null : String(id),
    raw: data,
  };
}

/** Something a code run showed, by MIME type: the value of its last expression
 * (`isMainResult`) or a figure or `display(x)` during it. */
export interface Result {
  data: Record<string, unknown>;
  isMainResult: boolean;
  text?: string;
  html?: string;
  markdown?: string;
  svg?: string;
  /** PNG, base64. */
  png?: string;
  /** JPEG, base64. */
  jpeg?: string;
  json?: unknown;
}

/** The exception a code run raised (`KeyboardInterrupt` when interrupted). */
export interface ExecutionError {
  name: string;
  value: string;
  traceback: string;
}

/** What a code run did. A raised exception is in `error`, not thrown. */
export interface Execution {
  results: Result[];
  logs: { stdout: string[]; stderr: string[] };
  error: ExecutionError | null;
  executionCount: number;
  timedOut: boolean;
  truncated: boolean;
  /** The last expression's value as text. */
  text: string | undefined;
}

export function codeResult(data: Record<string, unknown>, isMainResult: boolean): Result {
  const result: Result = { data, isMainResult };
  const text = (mime: string) => (typeof data[mime] === "string" ? (data[mime] as string) : undefined);
  const fields = {
    text: text("text/plain"),
    html: text("text/html"),
    markdown: text("text/markdown"),
    svg: text("image/svg+xml"),
    png: text("image/png"),
    jpeg: text("image/jpeg"),
  };
  for (const [key, value] of Object.entries(fields)) {
    if (value !== undefined) (result as unknown as Record<string, unknown>)[key] = value;
  }
  if ("application/json" in data) result.json = data["application/json"];
  return result;
}

export function execution(parts: Omit<Execution, "text">): Execution {
  return { ...parts, text: parts.results.find((r) => r.isMainResult)?.text };
}

export function executionFromJson(data: Json): Execution {
  const error = data.error as Json | null | undefined;
  return execution({
    results: ((data.results ?? []) as Json[]).map((r) =>
      codeResult({ ...((r.data ?? {}) as Record<string, unknown>) }, r.is_main_result === true),
    ),
    logs: {
      stdout: data.stdout ? [String(data.stdout)] : [],
      stderr: data.stderr ? [String(data.stderr)] : [],
    },
    error: error ? { name: String(error.name), value: String(error.value), traceback: String(error.traceback) } : null,
    executionCount: num(data.execution_count),
    timedOut: data.timed_out === true,
    truncated: data.truncated === true,
  });
}
