// Mobile conventions under Node: app.* lifecycle with a fake AppState, screen.view, the hello context, asyncStorage.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { after, before, test } from "node:test";
import { Eventwire, asyncStorage, memoryStorage } from "../dist/esm/index.js";
import { UNIT, startStack, until } from "./harness.mjs";

let stack;
before(async () => {
  stack = await startStack();
});
after(async () => {
  await stack?.stop();
});

const FLUSH = { timeout: 10_000 * UNIT };

/** React Native's AppState, as far as the SDK uses it. */
class FakeAppState {
  currentState = "active";
  listeners = new Set();
  addEventListener(type, listener) {
    assert.equal(type, "change");
    this.listeners.add(listener);
    return { remove: () => this.listeners.delete(listener) };
  }
  set(state) {
    this.currentState = state;
    for (const l of this.listeners) l(state);
  }
}

/** React Native's AsyncStorage: promises over a map. */
function fakeAsyncStorage() {
  const map = new Map();
  return {
    map,
    getItem: async (k) => (map.has(k) ? map.get(k) : null),
    setItem: async (k, v) => void map.set(k, v),
    removeItem: async (k) => void map.delete(k),
  };
}

const mine = (ew, site = "app") => stack.redis.producerEvents(ew.stats().producer, site);

test("app.start on launch; app.update on the first launch of a new version", async () => {
  const storage = memoryStorage();
  const v1 = new Eventwire({ url: stack.server.url(), storage, app: { name: "Shop", version: "2.3.0", build: "412" } });
  await v1.close();
  const again = new Eventwire({ url: stack.server.url(), storage, app: { name: "Shop", version: "2.3.0", build: "412" } });
  await again.close();
  const v2 = new Eventwire({ url: stack.server.url(), storage, app: { name: "Shop", version: "2.4.0", build: "420" } });
  await v2.close();
  assert.equal(v2.stats().producer, v1.stats().producer);
  assert.deepEqual(
    mine(v2).map((e) => [e.seq, e.action, e.params]),
    [
      [1, "app.start", { first_launch: true, version: "2.3.0", build: "412" }],
      [2, "app.start", { first_launch: false, version: "2.3.0", build: "412" }],
      [3, "app.start", { first_launch: false, version: "2.4.0", build: "420" }],
      [4, "app.update", { previous_version: "2.3.0", version: "2.4.0" }],
    ],
  );
});

test("AppState: app.background flushes and goes offline, app.foreground reconnects", async () => {
  const appState = new FakeAppState();
  const ew = new Eventwire({ url: stack.server.url(), storage: memoryStorage(), uuid: "rn-user" });
  const statuses = [];
  ew.on("status", (s) => statuses.push(s));
  const stop = ew.useAppState(appState);
  ew.screen("Checkout", { step: 2 });
  await ew.flush(FLUSH);
  appState.set("inactive"); // iOS passes through inactive: not a background
  appState.set("background");
  await until(() => ew.stats().status === "offline", 10_000 * UNIT, "offline after background");
  assert.equal(ew.stats().queued, 0, "the background flush delivered app.background");
  ew.track("product.view", { sku: "while-away" });
  appState.set("active");
  await ew.flush(FLUSH);
  assert.equal(ew.stats().status, "open");
  assert.equal(ew.stats().connects, 2);
  stop();
  assert.equal(appState.listeners.size, 0);
  await ew.close();
  assert.deepEqual(
    mine(ew).map((e) => [e.action, e.label, e.params]),
    [
      ["screen.view", "Viewed screen Checkout", { step: 2, name: "Checkout" }],
      ["app.background", "app.background", {}],
      ["product.view", "product.view", { sku: "while-away" }],
      ["app.foreground", "app.foreground", {}],
    ],
  );
  assert.deepEqual(statuses, ["connecting", "open", "offline", "connecting", "open", "offline"]);
});

test("the hello context carries app, os, device model and locale", async () => {
  const ew = new Eventwire({
    url: stack.server.url(),
    storage: memoryStorage(),
    uuid: "ctx-user",
    app: { name: "Shop", version: "2.3.0", build: "412" },
    platform: { OS: "android", Version: 34, constants: { Model: "Pixel 8", Manufacturer: "Google" } },
  });
  await ew.close();
  const start = stack.redis.events().find((e) => e.action === "session.start" && e.uuid === "ctx-user");
  const context = start.params.context;
  assert.deepEqual(context.app, { name: "Shop", version: "2.3.0", build: "412" });
  assert.deepEqual(context.os, { name: "android", version: "34" });
  assert.deepEqual(context.device, { model: "Pixel 8", manufacturer: "Google" });
  assert.equal(context.locale, Intl.DateTimeFormat().resolvedOptions().locale);
  assert.equal(context.library.name, "eventwire-js");
});

test("asyncStorage keeps the queue under its prefix and a restart goes on with the same producer", async () => {
  const store = fakeAsyncStorage();
  const first = new Eventwire({ url: "ws://127.0.0.1:1/v1/track/app", storage: asyncStorage(store), backoff: { baseMs: 20, maxMs: 50 } });
  first.track("product.view", { n: 1 });
  first.track("product.view", { n: 2 });
  await first.saved();
  await first.close({ timeout: 10 }); // never connected: both stay queued
  assert.ok([...store.map.keys()].every((k) => k.startsWith("eventwire:")));
  const second = new Eventwire({ url: stack.server.url(), storage: asyncStorage(store) });
  await second.flush(FLUSH);
  await second.close();
  assert.equal(second.stats().producer, first.stats().producer);
  assert.deepEqual(mine(second).map((e) => e.params.n), [1, 2]);
  assert.throws(() => asyncStorage({}), TypeError);
});

test("the package loads as CommonJS too, with type declarations", () => {
  const require = createRequire(import.meta.url);
  const cjs = require("../dist/cjs/index.js");
  for (const name of ["Eventwire", "fileStorage", "memoryStorage", "asyncStorage"]) assert.equal(typeof cjs[name], "function");
  assert.ok(existsSync(new URL("../dist/esm/index.d.ts", import.meta.url)));
  assert.ok(existsSync(new URL("../dist/cjs/index.d.ts", import.meta.url)));
});
