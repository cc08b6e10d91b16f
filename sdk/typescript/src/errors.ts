/**
 * Errors the SDK throws, one class per meaning. Every error from the daemon is a
 * {@link KilnError} carrying the HTTP status, the API's error `code` and `message`, and the
 * request id when the daemon gives one.
 */

export interface KilnErrorOptions {
  status?: number | undefined;
  code?: string | undefined;
  requestId?: string | undefined;
  cause?: unknown;
}

/** Anything that went wrong talking to kiln. */
export class KilnError extends Error {
  readonly status: number | undefined;
  readonly code: string | undefined;
  readonly requestId: string | undefined;

  constructor(message: string, options: KilnErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.status = options.status;
    this.code = options.code;
    this.requestId = options.requestId;
  }
}

/** No API key, or one the daemon does not know (HTTP 401). */
export class AuthenticationError extends KilnError {}
/** The key may not do this (HTTP 403). */
export class ForbiddenError extends KilnError {}
/** Something named in the call does not exist (HTTP 404). */
export class NotFoundError extends KilnError {}
/** No such sandbox for this key's tenant (destroyed, expired, or never made). */
export class SandboxNotFoundError extends NotFoundError {}
/** No such template; `Template.list()` lists them. */
export class TemplateNotFoundError extends NotFoundError {}
/** No such snapshot. */
export class SnapshotNotFoundError extends NotFoundError {}
/** No such file or directory in the sandbox. */
export class FileNotFoundError extends NotFoundError {}
/** No process with that pid or tag in the sandbox. */
export class ProcessNotFoundError extends NotFoundError {}
/** The request was malformed or impossible; the message names the field (HTTP 400). */
export class InvalidRequestError extends KilnError {}
/** The sandbox's state forbids it: failed, paused without auto-resume, path exists (409). */
export class ConflictError extends KilnError {}
/** A body or file over the daemon's limit, or the sandbox's disk is full (HTTP 413). */
export class TooLargeError extends KilnError {}
/** The sandbox could not do it (its own failure; the daemon is fine; HTTP 422). */
export class SandboxError extends KilnError {}
/** The sandbox does not answer right now, or the host ran out of capacity (HTTP 503). */
export class UnavailableError extends KilnError {}
/** The tenant is at a limit the operator set, e.g. its live sandboxes (HTTP 429): destroy some first. */
export class QuotaExceededError extends KilnError {}
/** The host's disk space for sandboxes (its reserve or budget) does not allow a create, fork, pause or snapshot now (HTTP 507). */
export class InsufficientStorageError extends KilnError {}
/** Something timed out; the message says what (a command, a request, the daemon). */
export class TimeoutError extends KilnError {}

/** A command finished with a non-zero exit code (or was killed by a signal). */
export class CommandExitError extends KilnError {
  readonly exitCode: number | null;
  readonly signal: number | null;
  readonly stdout: string;
  readonly stderr: string;

  constructor(result: { exitCode: number | null; signal: number | null; stdout: string; stderr: string }) {
    const how = result.exitCode !== null ? `exit code ${result.exitCode}` : `signal ${result.signal}`;
    const lastLine = (text: string) => text.trim().split("\n").filter(Boolean).pop();
    const tail = lastLine(result.stderr) ?? lastLine(result.stdout);
    super(`command failed with ${how}${tail ? `: ${tail}` : ""}`);
    this.exitCode = result.exitCode;
    this.signal = result.signal;
    this.stdout = result.stdout;
    this.stderr = result.stderr;
  }
}

type ErrorClass = new (message: string, options?: KilnErrorOptions) => KilnError;

const BY_CODE: Record<string, ErrorClass> = {
  unauthenticated: AuthenticationError,
  forbidden: ForbiddenError,
  invalid_request: InvalidRequestError,
  method_not_allowed: InvalidRequestError,
  conflict: ConflictError,
  too_large: TooLargeError,
  guest_error: SandboxError,
  unavailable: UnavailableError,
  quota_exceeded: QuotaExceededError,
  insufficient_storage: InsufficientStorageError,
  timeout: TimeoutError,
};

// The daemon's not-found messages start with what was not found: "sandbox `sb-1` not found".
const NOT_FOUND: Record<string, ErrorClass> = {
  sandbox: SandboxNotFoundError,
  template: TemplateNotFoundError,
  snapshot: SnapshotNotFoundError,
  path: FileNotFoundError,
  file: FileNotFoundError,
  process: ProcessNotFoundError,
};

/** The error for an HTTP error response of the daemon. */
export function errorFromResponse(status: number, body: string, headers: Headers): KilnError {
  let code: string | undefined;
  let message = "";
  let requestId = headers.get("x-request-id") ?? undefined;
  try {
    const parsed: unknown = JSON.parse(body);
    if (parsed && typeof parsed === "object") {
      const fields = parsed as Record<string, unknown>;
      if (typeof fields.code === "string") code = fields.code;
      if (fields.message !== undefined) message = String(fields.message);
      if (typeof fields.request_id === "string") requestId = fields.request_id;
    }
  } catch {
    // Not JSON: the text below says what came back.
  }
  if (!message) message = body.trim().slice(0, 500) || `HTTP ${status} with an empty body`;
  let cls: ErrorClass;
  if (status === 404 || code === "not_found") {
    const first = message.split(" ", 1)[0]?.toLowerCase() ?? "";
    cls = NOT_FOUND[first] ?? NotFoundError;
  } else if (code !== undefined && BY_CODE[code] !== undefined) {
    cls = BY_CODE[code] ?? KilnError;
  } else if (status === 401) {
    cls = AuthenticationError;
  } else if (status === 504) {
    cls = TimeoutError;
  } else if (status >= 400 && status < 500) {
    cls = InvalidRequestError;
  } else {
    cls = KilnError;
  }
  return new cls(message, { status, code: code ?? "http_error", requestId });
}
