/**
 * kiln's TypeScript SDK: sandboxes in microVMs for untrusted code.
 *
 * ```ts
 * import { Sandbox } from "@kiln-sandbox/sdk";
 * await using sandbox = await Sandbox.create();
 * console.log((await sandbox.commands.run("echo hello")).stdout);
 * ```
 *
 * Connection settings come from options, then `KILN_URL` and `KILN_API_KEY`, then the
 * CLI's config file (`kiln keys create --save`).
 */

export * from "./errors.js";
export type * from "./models.js";
export { cliConfigPath, resolveConfig, type ConnectionOptions, type ConnectionConfig } from "./config.js";
export {
  CommandHandle,
  Commands,
  DEFAULT_COMMAND_TIMEOUT_MS,
  Files,
  Pty,
  Sandbox,
  Snapshot,
  Template,
  type Cmd,
  type CreateOptions,
  type OutputCallback,
  type PtyOptions,
  type RunCodeOptions,
  type RunOptions,
} from "./sandbox.js";
