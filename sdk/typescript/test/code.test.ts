// Stateful code execution (runCode) in the python template's interpreter, against a real
// daemon (scripts/tests/sdk.sh).
import assert from "node:assert/strict";
import { test } from "node:test";

import * as kiln from "../src/index.js";
import { Sandbox } from "../src/index.js";

test("runCode keeps state, returns rich results, streams, interrupts", async () => {
  const sandbox = await Sandbox.create({ template: "python", metadata: { suite: "ts-sdk-code" } });
  try {
    const first = await sandbox.runCode("x = 6 * 7\nprint('side effect')\nx");
    assert.equal(first.text, "42");
    assert.deepEqual(first.logs.stdout, ["side effect\n"]);
    assert.equal((await sandbox.runCode("x + 1")).text, "43");

    const failed = await sandbox.runCode("1 / 0");
    assert.equal(failed.error?.name, "ZeroDivisionError");

    const figure = await sandbox.runCode("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nNone");
    const png = figure.results.find((r) => r.png)?.png;
    assert.ok(
      png &&
        Buffer.from(png, "base64")
          .subarray(0, 4)
          .equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])),
    );

    const seen: string[] = [];
    const results: kiln.Result[] = [];
    const streamed = await sandbox.runCode(
      "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.2)\n'end'",
      {
        onStdout: (text) => seen.push(text),
        onResult: (result) => results.push(result),
      },
    );
    assert.equal(seen.join(""), "0\n1\n2\n");
    assert.equal(streamed.text, "'end'");
    assert.deepEqual(
      results.map((r) => r.text),
      ["'end'"],
    );

    const runaway = await sandbox.runCode("while True:\n    pass", { timeoutMs: 1000 });
    assert.equal(runaway.timedOut, true);
    assert.equal(runaway.error?.name, "KeyboardInterrupt");
    assert.equal((await sandbox.runCode("x")).text, "42");

    const context = await sandbox.createCodeContext();
    assert.equal((await sandbox.runCode("x", { context })).error?.name, "NameError");
    assert.ok((await sandbox.listCodeContexts()).includes(context));
    assert.equal(await sandbox.interruptCode(context), false);
    assert.equal(await sandbox.deleteCodeContext(context), true);
    assert.equal(await sandbox.deleteCodeContext(context), false);
    await assert.rejects(sandbox.runCode("1", { language: "cobol" }), kiln.InvalidRequestError);
  } finally {
    await sandbox.kill();
  }
});
