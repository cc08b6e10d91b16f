/**
 * Where the daemon is and which key to use: options, then `KILN_URL` and `KILN_API_KEY`,
 * then the CLI's config file (`kiln keys create --save` writes it).
 */

import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { AuthenticationError, InvalidRequestError } from "./errors.js";

export const DEFAULT_URL = "http://127.0.0.1:7070";
export const DEFAULT_REQUEST_TIMEOUT_MS = 300_000;

/** How to reach the daemon; every field is optional (see the module's doc for defaults). */
export interface ConnectionOptions {
  /** The daemon's URL, e.g. `http://127.0.0.1:7070`. */
  url?: string;
  /** An API key (`kiln keys create`). */
  apiKey?: string;
  /** How long a request may take, in milliseconds (default 300 000). */
  requestTimeoutMs?: number;
}

export interface ConnectionConfig {
  url: string;
  apiKey: string;
  requestTimeoutMs: number;
}

/** `$XDG_CONFIG_HOME/kiln/cli.toml` or `~/.config/kiln/cli.toml`, as the CLI reads. */
export function cliConfigPath(): string {
  const base = process.env.XDG_CONFIG_HOME || join(process.env.HOME || homedir(), ".config");
  return join(base, "kiln", "cli.toml");
}

/**
 * The CLI's config: `key = "string"` lines (what `kiln keys create --save` writes), comments
 * and blank lines. Anything else is reported with its line rather than guessed at.
 */
export function parseCliConfig(text: string, path: string): Record<string, string> {
  const out: Record<string, string> = {};
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const match = /^([A-Za-z0-9_-]+)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(#.*)?$/.exec(line);
    if (!match || match[1] === undefined || match[2] === undefined) {
      throw new InvalidRequestError(`${path}:${index + 1}: expected key = "value"`);
    }
    out[match[1]] = JSON.parse(`"${match[2]}"`) as string;
  });
  return out;
}

function readCliConfig(): Record<string, string> {
  const path = cliConfigPath();
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return {};
    throw new InvalidRequestError(`reading the CLI config ${path}: ${String(e)}`, { cause: e });
  }
  return parseCliConfig(text, path);
}

/** The connection settings from options, the environment and the CLI config. */
export function resolveConfig(options: ConnectionOptions = {}, requireKey = true): ConnectionConfig {
  const needFile =
    (options.url === undefined && !process.env.KILN_URL) || (options.apiKey === undefined && !process.env.KILN_API_KEY);
  const file = needFile ? readCliConfig() : {};
  const url = options.url || process.env.KILN_URL || file.url || DEFAULT_URL;
  const apiKey = options.apiKey || process.env.KILN_API_KEY || file.api_key || "";
  if (!apiKey && requireKey) {
    throw new AuthenticationError(
      "no API key: pass apiKey, set KILN_API_KEY, or save one with `kiln keys create --tenant NAME --save`",
    );
  }
  return {
    url: url.replace(/\/+$/, ""),
    apiKey,
    requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
  };
}
