// The SDK against a real daemon with real sandboxes (scripts/tests/sdk.sh starts one and sets
// KILN_URL and KILN_API_KEY).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createServer, type AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import * as kiln from "../src/index.js";
import { Sandbox, Snapshot, Template } from "../src/index.js";

const TEMPLATE = process.env.KILN_TEST_TEMPLATE ?? "base";

if (!process.env.KILN_URL || !process.env.KILN_API_KEY) {
  throw new Error(
    "KILN_URL and KILN_API_KEY are not set: run `bash scripts/tests/sdk.sh typescript`, which starts a daemon for these tests",
  );
}

describe("one sandbox", () => {
  let sandbox: Sandbox;
  before(async () => {
    sandbox = await Sandbox.create({ template: TEMPLATE, timeoutMs: 900_000, metadata: { suite: "ts-sdk" } });
  });
  after(async () => {
    await sandbox?.kill();
  });

  test("commands run to completion", async () => {
    const result = await sandbox.commands.run("echo hello; echo oops >&2");
    assert.deepEqual([result.exitCode, result.stdout, result.stderr], [0, "hello\n", "oops\n"]);
    assert.equal((await sandbox.commands.run(["printf", "%s|", "a b", "$HOME"])).stdout, "a b|$HOME|");
    const env = await sandbox.commands.run("echo $GREETING $PWD $(id -un)", {
      envs: { GREETING: "hi" },
      cwd: "/tmp",
      user: "nobody",
    });
    assert.equal(env.stdout, "hi /tmp nobody\n");
    assert.equal((await sandbox.commands.run("cat", { stdin: "from stdin" })).stdout, "from stdin");
  });

  test("failures throw errors that say what happened", async () => {
    await assert.rejects(sandbox.commands.run("echo partial; echo bad thing >&2; exit 3"), (e: unknown) => {
      assert.ok(e instanceof kiln.CommandExitError);
      assert.equal(e.exitCode, 3);
      assert.equal(e.stdout, "partial\n");
      assert.match(e.message, /bad thing/);
      return true;
    });
    await assert.rejects(sandbox.commands.run("sleep 30", { timeoutMs: 1000 }), kiln.TimeoutError);
    await assert.rejects(sandbox.commands.run(""), kiln.InvalidRequestError);
  });

  test("output streams to callbacks as it comes", async () => {
    const pieces: [string, number][] = [];
    const errors: string[] = [];
    const result = await sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.3; done; echo done >&2", {
      onStdout: (text) => pieces.push([text, performance.now()]),
      onStderr: (text) => errors.push(text),
    });
    assert.equal(pieces.map(([text]) => text).join(""), "1\n2\n3\n");
    assert.equal(result.stdout, "1\n2\n3\n");
    assert.equal(errors.join(""), "done\n");
    assert.ok(pieces.length >= 2 && pieces.at(-1)![1] - pieces[0]![1] > 300);
  });

  test("background commands: stdin, list, connect, kill", async () => {
    const handle = await sandbox.commands.run("cat; echo end", { background: true, stdin: true, tag: "cat" });
    const listed = (await sandbox.commands.list()).find((p) => p.pid === handle.pid);
    assert.ok(listed?.running && listed.tag === "cat");
    await handle.sendStdin("line one\n");
    await sandbox.commands.sendStdin(handle.pid, new Uint8Array([0, 255, 98, 10]));
    await handle.closeStdin();
    const result = await handle.wait();
    assert.ok(result.stdout.startsWith("line one\n") && result.stdout.endsWith("b\nend\n"), result.stdout);

    const sleeper = await sandbox.commands.run("echo up; sleep 300", { background: true, tag: "sleeper" });
    const again = await sandbox.commands.connect("sleeper");
    assert.equal(again.pid, sleeper.pid);
    for await (const chunk of again) {
      assert.equal(chunk.text, "up\n");
      break;
    }
    assert.equal(await sleeper.kill(), true);
    await assert.rejects(sleeper.wait(), (e: unknown) => e instanceof kiln.CommandExitError && e.signal === 9);
    assert.equal(await sandbox.commands.kill(999_999), false);
    await assert.rejects(sandbox.commands.sendStdin(999_999, "x"), kiln.ProcessNotFoundError);
    await assert.rejects(sandbox.commands.sendStdin(handle.pid, "after close"), /stdin/);
    await assert.rejects(sandbox.commands.run("cat", { stdin: true }), TypeError);
  });

  test("terminals: size, input, output", async () => {
    const seen: string[] = [];
    const terminal = await sandbox.pty.create({
      rows: 24,
      cols: 80,
      cmd: 'stty size; read line; stty size; echo "got $line"',
      onData: (t) => seen.push(t),
    });
    for await (const _ of terminal) {
      if (seen.join("").includes("24 80")) break;
    }
    await sandbox.pty.resize(terminal.pid, { rows: 40, cols: 100 });
    await sandbox.pty.sendInput(terminal.pid, "typed\n");
    const result = await terminal.wait();
    const text = seen.join("");
    assert.ok(text.includes("40 100") && text.includes("got typed"), text);
    assert.equal(result.exitCode, 0);
    const plain = await sandbox.commands.run("sleep 5", { background: true });
    await assert.rejects(sandbox.pty.resize(plain.pid, { rows: 10, cols: 10 }), /terminal/);
    await plain.kill();
  });

  test("files", async () => {
    const files = sandbox.files;
    assert.equal((await files.write("/root/ts/a.txt", "héllo\n")).bytes, Buffer.byteLength("héllo\n"));
    assert.equal(await files.read("/root/ts/a.txt"), "héllo\n");
    const blob = randomBytes(3 * 1024 * 1024 + 17);
    assert.equal((await files.write("/root/ts/blob.bin", new Blob([blob]))).bytes, blob.length);
    assert.ok(Buffer.from(await files.read("/root/ts/blob.bin", { format: "bytes" })).equals(blob));
    const pieces: Uint8Array[] = [];
    for await (const piece of await files.read("/root/ts/blob.bin", { format: "stream" })) pieces.push(piece);
    assert.ok(Buffer.concat(pieces).equals(blob));
    await files.write("/root/ts/small.bin", new Uint8Array([0, 1]));
    const entries = new Map((await files.list("/root/ts")).map((e) => [e.name, e]));
    assert.equal(entries.get("blob.bin")?.size, blob.length);
    assert.equal((await files.getInfo("/root/ts")).kind, "dir");
    await files.makeDir("/root/ts/d/e");
    assert.equal(await files.exists("/root/ts/d/e"), true);
    assert.equal(await files.exists("/root/ts/nope"), false);
    await files.rename("/root/ts/a.txt", "/root/ts/d/b.txt");
    assert.equal(await files.read("/root/ts/d/b.txt"), "héllo\n");
    await assert.rejects(files.read("/root/ts/a.txt"), kiln.FileNotFoundError);
    await assert.rejects(files.remove("/root/ts/d"), kiln.ConflictError);
    await files.remove("/root/ts/d", { recursive: true });
    assert.equal(await files.exists("/root/ts/d"), false);
  });

  test("lifecycle: connect, list, timeout, errors, templates", async () => {
    const info = await sandbox.getInfo();
    assert.equal(info.state, "running");
    assert.deepEqual(info.metadata, { suite: "ts-sdk" });
    const same = await Sandbox.connect(sandbox.sandboxId);
    assert.equal((await same.commands.run("hostname")).stdout.trim(), sandbox.sandboxId);
    const page = await Sandbox.list({ metadata: { suite: "ts-sdk" }, state: "running" });
    assert.deepEqual(
      page.sandboxes.map((s) => s.sandboxId),
      [sandbox.sandboxId],
    );
    assert.equal((await Sandbox.list({ limit: 1 })).sandboxes.length, 1);
    const before = (await sandbox.getInfo()).expiresAtMs ?? 0;
    await sandbox.setTimeout(1_200_000);
    assert.ok(((await sandbox.getInfo()).expiresAtMs ?? 0) > before);
    await sandbox.keepalive();
    assert.equal(await sandbox.isRunning(), true);
    assert.equal(typeof (await sandbox.logs({ lines: 5 })), "string");
    const usage = await sandbox.getMetrics();
    assert.equal(usage.sandboxId, sandbox.sandboxId);
    assert.ok((usage.cpuSeconds ?? 0) > 0 && (usage.memoryBytes ?? 0) > 0 && (usage.diskBytes ?? 0) > 0);
    assert.equal(usage.networkRxBytes, null);
    // Without sandbox networking, there is no TCP forwarding either.
    await assert.rejects(
      sandbox.forwardPort(5432),
      (e: unknown) => e instanceof kiln.ConflictError && /forwarding is off/.test(String(e)),
    );
    assert.deepEqual(await sandbox.listForwards(), []);
    await assert.rejects(sandbox.closeForward(5432), kiln.NotFoundError);
    await sandbox.commands.run("sleep 600 & sleep 600 & touch /tmp/sleepers; wait", {
      background: true,
      tag: "sleepers",
    });
    await sandbox.commands.run("while [ ! -e /tmp/sleepers ]; do sleep 0.05; done");
    assert.ok((await sandbox.killAllProcesses()) >= 3); // the shell and its two sleeps
    assert.equal((await sandbox.commands.run("echo alive")).stdout.trim(), "alive");
    await assert.rejects(Sandbox.connect("sb-000000000000"), (error: unknown) => {
      // The daemon's request id, to find the call in its log.
      assert.ok(error instanceof kiln.SandboxNotFoundError);
      assert.match(error.requestId ?? "", /^req_[0-9a-f]{16}$/);
      return true;
    });
    await assert.rejects(Sandbox.connect(sandbox.sandboxId, { apiKey: "kiln_wrong" }), kiln.AuthenticationError);
    await assert.rejects(Sandbox.create({ template: "no-such-template" }), kiln.TemplateNotFoundError);
    const closed = await new Promise<number>((resolve) => {
      const server = createServer().listen(0, "127.0.0.1", () => {
        const port = (server.address() as AddressInfo).port;
        server.close(() => resolve(port));
      });
    });
    await assert.rejects(Sandbox.list({ url: `http://127.0.0.1:${closed}` }), kiln.UnavailableError);
    const health = await Sandbox.health();
    assert.equal(health.status, "ok");
    assert.ok((await Template.list()).some((t) => t.name === TEMPLATE));
    assert.equal((await Template.get(TEMPLATE)).ready, true);
    assert.equal((await Template.build({ name: TEMPLATE })).name, TEMPLATE);
    assert.equal(await Template.delete("no-such-template"), false);
  });
});

test("pause, resume, fork, snapshots, events, await using", async () => {
  const events: kiln.SandboxEvent[] = [];
  let parentId = "";
  const watcher = (async () => {
    for await (const event of Sandbox.events()) {
      events.push(event);
      if (event.type === "destroyed" && event.sandboxId === parentId) return;
    }
  })();
  await new Promise((resolve) => setTimeout(resolve, 300));
  {
    await using parent = await Sandbox.create({ template: TEMPLATE, metadata: { suite: "ts-sdk-state" } });
    parentId = parent.sandboxId;
    await parent.commands.run("echo kept > /root/kept; echo in-memory > /dev/shm/mem");
    assert.equal((await parent.pause()).state, "paused");
    assert.equal((await parent.resume()).state, "running");
    await parent.pause();
    assert.equal(await parent.files.read("/dev/shm/mem"), "in-memory\n"); // auto-resume

    const children = await parent.fork(2, { metadata: { child: "yes" } });
    try {
      assert.equal(new Set([parent.sandboxId, ...children.map((c) => c.sandboxId)]).size, 3);
      for (const child of children) {
        const info = await child.getInfo();
        assert.equal(info.parentId, parent.sandboxId);
        assert.equal(info.metadata.child, "yes");
        assert.equal(
          (await child.commands.run("cat /dev/shm/mem; hostname")).stdout,
          `in-memory\n${child.sandboxId}\n`,
        );
      }
      await children[0]!.files.write("/root/kept", "changed");
      assert.equal(await parent.files.read("/root/kept"), "kept\n");
    } finally {
      for (const child of children) await child.kill();
    }

    const snapshot = await parent.createSnapshot("sdk-ts-snap");
    assert.equal(snapshot.sandboxId, parent.sandboxId);
    assert.equal((await Snapshot.get("sdk-ts-snap")).snapshotId, snapshot.snapshotId);
    assert.ok((await Snapshot.list()).some((s) => s.name === "sdk-ts-snap"));
    {
      await using restored = await Sandbox.create({ snapshot: "sdk-ts-snap" });
      assert.equal((await restored.commands.run("cat /root/kept /dev/shm/mem")).stdout, "kept\nin-memory\n");
      await assert.rejects(Snapshot.delete("sdk-ts-snap"), kiln.ConflictError);
    }
  }
  assert.equal(await Snapshot.delete("sdk-ts-snap"), true);
  assert.equal(await Snapshot.delete("sdk-ts-snap"), false);
  await assert.rejects(Sandbox.connect(parentId), kiln.SandboxNotFoundError);
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error("no destroyed event within 60 s")), 60_000);
  });
  await Promise.race([watcher, deadline]).finally(() => clearTimeout(timer));
  const seen = new Set(events.map((e) => `${e.type} ${e.sandboxId}`));
  assert.ok(seen.has(`created ${parentId}`) && seen.has(`destroyed ${parentId}`), [...seen].join(", "));
});
