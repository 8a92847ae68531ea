// Starting and stopping the real processes the end-to-end tests need: redis-server
// on a free port and the cerbas binary (CERBAS_BIN, else target/debug/cerbas).
// Not tests themselves; shared by cerbas.test.js and faults.test.js.

'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');

const assert = require('node:assert/strict');

const { Client, CerbasError, CerbasTimeout } = require('..');

/** Milliseconds on a monotonic clock: for durations and deadlines (the wall clock
 * may be stepped while a test runs). */
const now = () => performance.now();

const REPO = path.resolve(__dirname, '..', '..', '..');
const CERBAS_BIN = process.env.CERBAS_BIN || path.join(REPO, 'target', 'debug', 'cerbas');
const REDIS_SERVER = process.env.REDIS_SERVER || '/usr/bin/redis-server';
const CONFIG = path.join(REPO, 'cerbas.toml');

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function logTail(file, lines = 40) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/** Starts `cmd`, its output to `log`; `proc.exited` resolves to its exit code. */
function start(cmd, args, log, options = {}) {
  const out = fs.openSync(log, 'w');
  const proc = spawn(cmd, args, { stdio: ['ignore', out, out], ...options });
  fs.closeSync(out);
  proc.exited = new Promise((resolve) => {
    proc.on('exit', (code, signal) => resolve(code ?? signal));
    proc.on('error', (err) => resolve(err));
  });
  return proc;
}

function running(proc) {
  return proc.exitCode === null && proc.signalCode === null;
}

/** SIGTERM, then SIGKILL if `proc` has not exited after `graceMs`. */
async function stop(proc, graceMs = 10000) {
  if (!proc || !running(proc)) return;
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
  await proc.exited;
  clearTimeout(timer);
}

/** One PING over a raw socket: resolves true if Redis answers (+PONG, or -NOAUTH). */
function ping(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => done(/^(\+PONG|-NOAUTH)/.test(d.toString())));
  });
}

/**
 * Starts redis-server (no persistence) on `port`, else a free one, with `extra`
 * arguments; resolves once it answers PING (or asks for a password). `port` lets a
 * test restart Redis where its clients look for it.
 */
async function startRedis(dir, port = null, extra = []) {
  port ??= await freePort();
  const log = path.join(dir, `redis-${port}-${Date.now()}.log`);
  const proc = start(REDIS_SERVER, [
    '--port', String(port), '--bind', '127.0.0.1',
    '--save', '', '--appendonly', 'no', '--dir', dir, ...extra,
  ], log);
  const deadline = now() + 10000;
  try {
    while (!(await ping(port))) {
      if (!running(proc)) throw new Error(`redis-server exited:\n${logTail(log)}`);
      if (now() > deadline) throw new Error(`redis-server did not answer PING:\n${logTail(log)}`);
      await sleep(20); // poll interval, bounded by the deadline
    }
  } catch (err) {
    await stop(proc);
    throw err;
  }
  return { proc, port, url: `redis://127.0.0.1:${port}`, log };
}

async function startCerbas(redisUrl, dir) {
  try {
    fs.accessSync(CERBAS_BIN, fs.constants.X_OK);
  } catch {
    throw new Error(`no cerbas binary at ${CERBAS_BIN}: run \`cargo build\` or set CERBAS_BIN`);
  }
  const env = { RUST_LOG: 'info', ...process.env };
  delete env.CERBAS_REDIS_URL;
  delete env.CERBAS_ENV;
  const log = path.join(dir, `cerbas-${Date.now()}-${Math.random().toString(16).slice(2, 8)}.log`);
  const proc = start(CERBAS_BIN, ['--config', CONFIG, '--redis', redisUrl, '--http', ''], log, { cwd: REPO, env });
  // Round trip `hello` until the server answers (a debug build may start slowly).
  const c = new Client({ url: redisUrl, env: 'dev' });
  const deadline = now() + 20000;
  try {
    for (;;) {
      if (!running(proc)) throw new Error(`cerbas exited:\n${logTail(log)}`);
      try {
        if ((await c.request('hello', null, { timeoutMs: 500 })).status === 'ok') break;
      } catch (err) {
        if (!(err instanceof CerbasTimeout)) throw err;
      }
      if (now() > deadline) throw new Error(`cerbas did not answer hello:\n${logTail(log)}`);
    }
  } catch (err) {
    await stop(proc);
    throw err;
  } finally {
    await c.close();
  }
  return { proc, log, redisUrl };
}


/** Polls `check` (async) until it returns a truthy value, failing after `ms`. */
async function waitFor(what, check, ms = 10000) {
  const deadline = now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10); // poll interval, bounded by the deadline
  }
}

/**
 * A TCP proxy on a free port to 127.0.0.1:`targetPort`. While `hold` is true it
 * accepts new connections but connects them only on `release()`: a test can keep a
 * client from reconnecting while Redis moves on. Closing either side closes both.
 */
async function startProxy(targetPort) {
  const held = [];
  const sockets = new Set();
  const proxy = { hold: false, port: null };
  const join = (client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    sockets.add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', end);
      s.on('close', end);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  };
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on('error', () => client.destroy());
    if (proxy.hold) held.push(client);
    else join(client);
  });
  await new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  proxy.port = server.address().port;
  proxy.url = `redis://127.0.0.1:${proxy.port}`;
  proxy.held = () => held.length;
  proxy.release = () => {
    proxy.hold = false;
    for (const client of held.splice(0)) if (!client.destroyed) join(client);
  };
  proxy.close = () => {
    for (const s of sockets) s.destroy();
    return new Promise((resolve) => server.close(resolve));
  };
  return proxy;
}

/** A reply `{status: "ok", data}`. */
const ok = (data) => ({ status: 'ok', data });

/** `p`, marked handled: it may reject before the test gets to assert on it. */
function later(p) {
  p.catch(() => {});
  return p;
}

/** Resolves to `{value}` or `{reason}`, never rejects. */
const settled = (p) => p.then((value) => ({ value }), (reason) => ({ reason }));

/**
 * Asserts that `err` is a `Class` and, as every rejection of the client is, a
 * CerbasError and an Error (the hierarchy index.js documents); returns true, for
 * assert.rejects.
 */
function assertCerbasError(err, Class, what = 'the rejection') {
  assert.ok(err instanceof Class, `${what} is not a ${Class.name}: ${err?.stack ?? JSON.stringify(err)}`);
  assert.ok(err instanceof CerbasError, `${Class.name} is not a CerbasError`);
  assert.ok(err instanceof Error, `${Class.name} is not an Error`);
  return true;
}

/**
 * The Node clients' connections to Redis, as `CLIENT LIST` lines (over `r`, a
 * node-redis connection), by name: `cerbas-node` (commands) and `cerbas-node-sub`
 * (subscriptions), or only those named `name`.
 */
async function clientConnections(r, name = null) {
  const lines = (await r.sendCommand(['CLIENT', 'LIST'])).split('\n');
  return lines.filter((l) => {
    const m = / name=(cerbas-node(?:-sub)?) /.exec(l);
    return m && (name === null || m[1] === name);
  });
}

/** Removes the tests' folder of logs, unless CERBAS_KEEP_LOGS asks to keep it. */
function dropLogs(dir) {
  if (process.env.CERBAS_KEEP_LOGS) console.error(`server logs in ${dir}`);
  else if (dir) fs.rmSync(dir, { recursive: true, force: true });
}

module.exports = { REPO, assertCerbasError, clientConnections, now, ok, later, settled, dropLogs, startProxy, freePort, logTail, running, start, stop, ping, startRedis, startCerbas, waitFor };
