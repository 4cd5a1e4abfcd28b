// The test harness: a private redis-server and real `eventwire serve` processes on free loopback ports.
// Every timeout is a multiple of EVENTWIRE_TEST_UNIT (as in the Python tests).
import { spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const UNIT = Number(process.env.EVENTWIRE_TEST_UNIT ?? "1");
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.EVENTWIRE_PYTHON ?? join(ROOT, ".venv/bin/python");

export const SITES_TOML = `
[sites.app]
origins = []
allow_no_origin = true

[sites.slow]
origins = []
allow_no_origin = true
rate = { events_per_second = 1500, burst = 100 }

[sites.strict]
origins = []
allow_no_origin = true
allow = ["product.*", "app.*", "screen.*"]

[sites.secure]
origins = []
allow_no_origin = true
auth = "token"
authenticated = ["form.submit"]
keys = [{ alg = "HS256", secret_env = "EW_JS_TEST_SECRET" }]
`;

/** The HS256 secret of the site "secure" (the server gets it in its environment). */
export const SECRET = "js-sdk-test-secret-0123456789abcdef";

/** A JWT for the site "secure": sub = uuid, exp `expiresIn` seconds from now (negative: expired). */
export function jwt(uuid, site = "secure", expiresIn = 600) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: uuid, aud: site, iat: now, exp: now + expiresIn })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export function tempDir(prefix) {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitPort(port, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const up = await new Promise((ok) => {
      const c = connect(port, "127.0.0.1", () => (c.end(), ok(true)));
      c.once("error", () => ok(false));
    });
    if (up) return;
    await sleep(20);
  }
  throw new Error(`nothing listens on ${port} after ${timeoutMs} ms`);
}

/** Wait until `check()` is truthy; its last value. */
export async function until(check, timeoutMs = 10_000 * UNIT, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export class Redis {
  async start() {
    this.dir = tempDir("ew-js-redis-");
    this.port = await freePort();
    this.proc = spawn(
      "redis-server",
      ["--port", String(this.port), "--bind", "127.0.0.1", "--dir", this.dir, "--save", "", "--appendonly", "no",
        "--logfile", join(this.dir, "redis.log")],
      { stdio: "ignore" },
    );
    await waitPort(this.port, 10_000 * UNIT);
    return this;
  }
  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }
  cli(...args) {
    const r = spawnSync("redis-cli", ["-p", String(this.port), "--raw", ...args], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`redis-cli ${args.join(" ")}: ${r.stderr}`);
    return r.stdout;
  }
  /** Every stored event of a site's stream, decoded. */
  events(site = "app") {
    const out = this.cli("XRANGE", `ew:{${site}}:events`, "-", "+").split("\n");
    const events = [];
    for (let i = 0; i + 2 < out.length; i += 3) events.push(JSON.parse(out[i + 2]));
    return events;
  }
  /** The events a producer sent (server-made ones left out). */
  producerEvents(producer, site = "app") {
    return this.events(site).filter((e) => e.producer === producer);
  }
  async stop() {
    this.proc?.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export class Server {
  constructor(redis, env = {}) {
    this.redis = redis;
    this.env = env;
    this.dir = tempDir("ew-js-server-");
    this.sites = join(this.dir, "sites.toml");
    writeFileSync(this.sites, SITES_TOML);
    this.port = 0;
  }
  /** Start (port 0: any free port; else that one, e.g. to restart) and wait for the `listening` line. */
  async start(port = this.port) {
    this.proc = spawn(
      PYTHON,
      ["-m", "eventwire", "serve", "--listen", `127.0.0.1:${port}`, "--admin", "127.0.0.1:0",
        "--redis", this.redis.url, "--sites", this.sites],
      { cwd: ROOT, env: { ...process.env, EW_JS_TEST_SECRET: SECRET, ...this.env, EVENTWIRE_CONFIG: "/dev/null" }, stdio: ["ignore", "pipe", "inherit"] },
    );
    const lines = createInterface({ input: this.proc.stdout });
    const exited = new Promise((_, fail) => this.proc.once("exit", (code) => fail(new Error(`server exited ${code}`))));
    exited.catch(() => {});
    const listening = new Promise((ok) => {
      lines.on("line", (line) => {
        let record;
        try {
          record = JSON.parse(line);
        } catch {
          return;
        }
        if (record.event === "listening") ok(record);
      });
    });
    let timer;
    const timeout = new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error("server did not start listening")), 15_000 * UNIT);
    });
    const record = await Promise.race([listening, exited, timeout]).finally(() => clearTimeout(timer));
    this.port = Number(String(record.track).split(":").pop());
    return this;
  }
  url(site = "app") {
    return `ws://127.0.0.1:${this.port}/v1/track/${site}`;
  }
  /** SIGTERM (drain) and wait for the exit. */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    const done = new Promise((ok) => this.proc.once("exit", ok));
    this.proc.kill("SIGTERM");
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 20_000 * UNIT);
    await done;
    clearTimeout(t);
  }
  async dispose() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A Redis and a server for one test file; `after` stops both. */
export async function startStack(env) {
  const redis = await new Redis().start();
  const server = await new Server(redis, env).start(0);
  return {
    redis,
    server,
    async stop() {
      await server.dispose();
      await redis.stop();
    },
  };
}
