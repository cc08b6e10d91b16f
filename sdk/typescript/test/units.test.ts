// Unit tests without a daemon: error mapping, streamed events, config, line splitting.
import assert from "node:assert/strict";
import { test } from "node:test";

import * as kiln from "../src/index.js";
import { parseCliConfig } from "../src/config.js";
import { EventCollector, checked } from "../src/sandbox.js";
import { splitLines } from "../src/transport.js";

const headers = new Headers({ "x-request-id": "req-1" });

test("errors map to classes by meaning", () => {
  const cases: [number, string, new (...args: never[]) => kiln.KilnError][] = [
    [401, '{"code":"unauthenticated","message":"missing or invalid API key"}', kiln.AuthenticationError],
    [403, '{"code":"forbidden","message":"admin only"}', kiln.ForbiddenError],
    [404, '{"code":"not_found","message":"sandbox `sb-1` not found"}', kiln.SandboxNotFoundError],
    [404, '{"code":"not_found","message":"template `py` not found"}', kiln.TemplateNotFoundError],
    [404, '{"code":"not_found","message":"snapshot `s` not found"}', kiln.SnapshotNotFoundError],
    [404, '{"code":"not_found","message":"path `/x` not found"}', kiln.FileNotFoundError],
    [404, '{"code":"not_found","message":"process `7` not found"}', kiln.ProcessNotFoundError],
    [404, '{"code":"not_found","message":"route not found"}', kiln.NotFoundError],
    [400, '{"code":"invalid_request","message":"bad"}', kiln.InvalidRequestError],
    [409, '{"code":"conflict","message":"in use"}', kiln.ConflictError],
    [413, '{"code":"too_large","message":"big"}', kiln.TooLargeError],
    [422, '{"code":"guest_error","message":"x"}', kiln.SandboxError],
    [503, '{"code":"unavailable","message":"busy"}', kiln.UnavailableError],
    [429, '{"code":"quota_exceeded","message":"at most 2"}', kiln.QuotaExceededError],
    [507, '{"code":"insufficient_storage","message":"reserve"}', kiln.InsufficientStorageError],
    [504, '{"code":"timeout","message":"slow"}', kiln.TimeoutError],
    [502, "<html>bad gateway</html>", kiln.KilnError],
  ];
  for (const [status, body, cls] of cases) {
    const error = kiln.errorFromResponse(status, body, headers);
    assert.equal(error.constructor, cls, `${status} ${body}`);
    assert.equal(error.name, cls.name);
    assert.equal(error.status, status);
    assert.equal(error.requestId, "req-1");
    assert.ok(error.message);
    assert.ok(error instanceof kiln.KilnError && error instanceof Error);
  }
  const fromBody = kiln.errorFromResponse(500, '{"code":"internal","message":"m","request_id":"r2"}', new Headers());
  assert.equal(fromBody.requestId, "r2");
  assert.match(kiln.errorFromResponse(500, "", new Headers()).message, /empty body/);
});

test("the collector streams output and builds the result", () => {
  const seen: string[] = [];
  const collector = new EventCollector((text) => seen.push(text));
  collector.feed({ type: "start", pid: 7 });
  collector.feed({ type: "stdout", data: "a\n" });
  collector.feed({ type: "stderr", data_b64: "/w==" });
  collector.feed({ type: "stdout", data: "b" });
  assert.equal(collector.result, null);
  collector.feed({ type: "exit", exit_code: 3, signal: null, timed_out: false });
  const result = collector.finish();
  assert.deepEqual(
    [collector.pid, seen, result.stdout, result.stderr, result.exitCode],
    [7, ["a\n", "b"], "a\nb", "\ufffd", 3],
  );
  assert.throws(
    () => checked(result),
    (e: unknown) => e instanceof kiln.CommandExitError && e.exitCode === 3 && e.stdout === "a\nb",
  );
  assert.throws(
    () => new EventCollector().feed({ type: "error", code: "unavailable", message: "gone" }),
    /broke: gone/,
  );
  assert.throws(() => new EventCollector().finish(), /ended before its exit/);
  assert.throws(() => checked({ ...result, exitCode: null, signal: 9, timedOut: true }), kiln.TimeoutError);
});

test("the CLI config is read as the CLI writes it, and bad lines are named", () => {
  assert.deepEqual(parseCliConfig('# saved\nurl = "http://h:1"\napi_key = "k\\"q"  # c\n\n', "cli.toml"), {
    url: "http://h:1",
    api_key: 'k"q',
  });
  assert.throws(() => parseCliConfig("url = [", "cli.toml"), /cli.toml:1: expected/);
});

test("config precedence: options, then the environment, then the file", () => {
  const saved = { ...process.env };
  try {
    process.env.KILN_URL = "http://env:2/";
    process.env.KILN_API_KEY = "env-key";
    assert.deepEqual(kiln.resolveConfig({}), { url: "http://env:2", apiKey: "env-key", requestTimeoutMs: 300_000 });
    assert.equal(kiln.resolveConfig({ apiKey: "arg", url: "http://arg:3" }).apiKey, "arg");
    delete process.env.KILN_API_KEY;
    process.env.XDG_CONFIG_HOME = "/nonexistent-kiln-test";
    assert.throws(() => kiln.resolveConfig({}), kiln.AuthenticationError);
    assert.equal(kiln.resolveConfig({}, false).apiKey, "");
  } finally {
    process.env = saved;
  }
});

test("lines are split across chunk boundaries and multi-byte characters", async () => {
  const bytes = new TextEncoder().encode('{"a":"é"}\n{"b":2}\n{"c":3}');
  async function* pieces() {
    for (let i = 0; i < bytes.length; i += 3) yield bytes.slice(i, i + 3);
  }
  const lines: string[] = [];
  for await (const line of splitLines(pieces())) lines.push(line);
  assert.deepEqual(lines, ['{"a":"é"}', '{"b":2}', '{"c":3}']);
});

test("network policies carry their limits both ways", async () => {
  const { networkJson, sandboxInfo } = await import("../src/models.js");
  const body = networkJson({ internet: false, allowOut: ["example.test"], bandwidthMbit: 8, maxConnections: 64 });
  assert.deepEqual(body, {
    internet: false,
    allow_out: ["example.test"],
    deny_out: [],
    bandwidth_mbit: 8,
    max_connections: 64,
  });
  assert.deepEqual(networkJson({}), { internet: true, allow_out: [], deny_out: [] });
  const info = sandboxInfo({ id: "sb-1", template: "base", network: body });
  assert.deepEqual(info.network, {
    internet: false,
    allowOut: ["example.test"],
    denyOut: [],
    bandwidthMbit: 8,
    maxConnections: 64,
  });
  assert.equal(
    sandboxInfo({ id: "sb-1", template: "base", network: { internet: true } }).network?.maxConnections,
    null,
  );
});
