// Every API operation has a method in this SDK unless sdk/excluded-operations.json excludes
// it with a reason; every operation a method names exists.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { CommandHandle, Commands, Files, Pty, Sandbox, Snapshot, Template } from "../src/index.js";

const repo = process.env.KILN_REPO_ROOT ?? join(import.meta.dirname, "..", "..", "..", "..");

function apiOperations(): Set<string> {
  const document = JSON.parse(readFileSync(join(repo, "docs", "openapi.json"), "utf8")) as {
    paths: Record<string, Record<string, { operationId: string }>>;
  };
  return new Set(Object.values(document.paths).flatMap((methods) => Object.values(methods).map((m) => m.operationId)));
}

function declared(): Map<string, string[]> {
  const found = new Map<string, string[]>();
  const classes = { CommandHandle, Commands, Files, Pty, Sandbox, Snapshot, Template };
  for (const [name, cls] of Object.entries(classes)) {
    for (const [owner, where] of [
      [cls.prototype, "#"],
      [cls, "."],
    ] as const) {
      for (const key of Reflect.ownKeys(owner)) {
        const member = Object.getOwnPropertyDescriptor(owner, key)?.value as { kilnOperations?: string[] } | undefined;
        for (const operation of member?.kilnOperations ?? []) {
          found.set(operation, [...(found.get(operation) ?? []), `${name}${where}${String(key)}`]);
        }
      }
    }
  }
  return found;
}

const excluded = JSON.parse(readFileSync(join(repo, "sdk", "excluded-operations.json"), "utf8")) as Record<
  string,
  string
>;

test("every API operation has a method", () => {
  const methods = declared();
  const missing = [...apiOperations()].filter((op) => !(op in excluded) && !methods.has(op));
  assert.deepEqual(missing, [], `no method for ${missing.join(", ")}`);
});

test("methods name real operations; exclusions are real, reasoned and unused", () => {
  const known = apiOperations();
  const methods = declared();
  assert.deepEqual(
    [...methods.keys()].filter((op) => !known.has(op)),
    [],
  );
  assert.deepEqual(
    Object.keys(excluded).filter((op) => !known.has(op)),
    [],
  );
  assert.ok(Object.values(excluded).every((reason) => reason.length > 20));
  assert.deepEqual(
    Object.keys(excluded).filter((op) => methods.has(op)),
    [],
  );
});
