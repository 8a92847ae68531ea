// End-to-end tests of the client against a real redis-server and the cerbas binary
// (the example functions of src/functions.rs, configured by cerbas.toml).
//
// Needs /usr/bin/redis-server (or REDIS_SERVER) and a built server (`cargo build`
// at the repository root; or CERBAS_BIN). Run from clients/node: `npm test`.

'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { createClient } = require('redis');

const { Client, CerbasTimeout } = require('..');

const REPO = path.resolve(__dirname, '..', '..', '..');
const CERBAS_BIN = process.env.CERBAS_BIN || path.join(REPO, 'target', 'debug', 'cerbas');
const REDIS_SERVER = process.env.REDIS_SERVER || '/usr/bin/redis-server';
const CONFIG = path.join(REPO, 'cerbas.toml');

// --- processes we start, and stop ------------------------------------------------

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

/** One PING over a raw socket: resolves true on +PONG, false otherwise. */
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
    sock.on('data', (d) => done(d.toString().startsWith('+PONG')));
  });
}

async function startRedis(dir) {
  const port = await freePort();
  const log = path.join(dir, `redis-${port}.log`);
  const proc = start(REDIS_SERVER, [
    '--port', String(port), '--bind', '127.0.0.1',
    '--save', '', '--appendonly', 'no', '--dir', dir,
  ], log);
  const deadline = Date.now() + 10000;
  try {
    while (!(await ping(port))) {
      if (!running(proc)) throw new Error(`redis-server exited:\n${logTail(log)}`);
      if (Date.now() > deadline) throw new Error(`redis-server did not answer PING:\n${logTail(log)}`);
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
  const deadline = Date.now() + 20000;
  try {
    for (;;) {
      if (!running(proc)) throw new Error(`cerbas exited:\n${logTail(log)}`);
      try {
        if ((await c.request('hello', null, { timeoutMs: 500 })).status === 'ok') break;
      } catch (err) {
        if (!(err instanceof CerbasTimeout)) throw err;
      }
      if (Date.now() > deadline) throw new Error(`cerbas did not answer hello:\n${logTail(log)}`);
    }
  } catch (err) {
    await stop(proc);
    throw err;
  } finally {
    await c.close();
  }
  return { proc, log, redisUrl };
}

// --- one Redis and one cerbas for the whole file ---------------------------------

let tmp;
let redisSrv;
let cerbas;
let client;

before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cerbas-node-'));
  redisSrv = await startRedis(tmp);
  cerbas = await startCerbas(redisSrv.url, tmp);
  client = new Client({ url: redisSrv.url, env: 'dev', user: 'foo', source: 'cerbastest' });
});

after(async () => {
  if (client) await client.close();
  if (cerbas) {
    if (!running(cerbas.proc)) console.error(`cerbas had exited:\n${logTail(cerbas.log)}`);
    await stop(cerbas.proc);
  }
  if (redisSrv) await stop(redisSrv.proc);
  // The servers' logs: kept with CERBAS_KEEP_LOGS=1 (failures above show their tails).
  if (process.env.CERBAS_KEEP_LOGS) console.error(`server logs in ${tmp}`);
  else if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

const ok = (data) => ({ status: 'ok', data });
const error = (data) => ({ status: 'error', data });

// --- the functions of src/functions.rs -------------------------------------------

test('hello', async () => {
  assert.deepEqual(await client.request('hello'), ok('hello world!'));
});

test('hello as msgpack', async () => {
  assert.deepEqual(await client.request('hello', null, { msgpack: true }), ok('hello world!'));
});

test('hello as the default user and source ("test")', async () => {
  const c = new Client({ url: redisSrv.url, env: 'dev' });
  try {
    assert.deepEqual(await c.request('hello'), ok('hello world!'));
  } finally {
    await c.close();
  }
});

test('echo', async () => {
  assert.deepEqual(await client.request('echo', { message: 'hi there' }), ok('hi there'));
});

test('withargs', async () => {
  assert.deepEqual(
    await client.request('withargs', { foo: { bar: [1, 'two'] } }),
    ok({ bar: [1, 'two'] }),
  );
});

test('witherror', async () => {
  assert.deepEqual(await client.request('witherror'), error('unexpected error'));
});

test('sum', async () => {
  const reply = await client.request('sum', { a: 1, b: 2 });
  assert.deepEqual(reply, ok(3));
  assert.ok(Number.isInteger(reply.data));
});

test('sum of a string is invalid arguments', async () => {
  const reply = await client.request('sum', { a: 'one', b: 2 });
  assert.equal(reply.status, 'error');
  assert.match(reply.data, /^invalid arguments/);
});

test('dummy', async () => {
  assert.deepEqual(await client.request('dummy'), ok(null));
});

test('asyncfunc', async () => {
  assert.deepEqual(await client.request('asyncfunc'), ok(''));
});

test('sleep', async () => {
  assert.deepEqual(await client.request('sleep', { ms: 5 }), ok(5));
});

test('tally', async () => {
  const name = `node-${process.pid}-${Date.now()}-tally`;
  assert.deepEqual(await client.request('tally', { name }), ok(1));
  assert.deepEqual(await client.request('tally', { name }, { msgpack: true }), ok(2));
});

test('primes', async () => {
  assert.deepEqual(await client.request('primes', { below: 100 }), ok(25));
});

test('unknown function', async () => {
  assert.deepEqual(await client.request('nope'), error('unknown function: nope'));
});

test('unregistered user', async () => {
  assert.deepEqual(
    await client.request('hello', null, { user: 'eve' }),
    error('user not registered: eve'),
  );
});

test('halt is refused to user "test"', async () => {
  assert.deepEqual(
    await client.request('halt', { delay: 0 }, { user: 'test', source: 'test' }),
    error('user test may not call halt'),
  );
});

// --- JSON and msgpack replies carry the same values ------------------------------

const ECHO_VALUES = {
  unicode: 'ü€😀 — 漢字 \u0000 \\ " \n',
  nested: { nested: { list: [1, -2, 3.5, 'x', null, true, false] }, empty: {}, e: [] },
  deep: [[[[['deep']]]]],
  'max safe integer': 2 ** 53 - 1,
  'min safe integer': -(2 ** 53 - 1),
  'minus one': -1,
  zero: 0,
  '0.1': 0.1,
  '-2.5': -2.5,
  null: null,
  'empty object': {},
  'empty array': [],
  'empty string': '',
  'long list': Array.from({ length: 20000 }, (_, i) => i),
  'long string': 'x'.repeat(200000),
};

for (const [name, value] of Object.entries(ECHO_VALUES)) {
  test(`echo round trip: ${name}`, async () => {
    const json = await client.request('echo', { message: value });
    const msgpack = await client.request('echo', { message: value }, { msgpack: true });
    assert.deepEqual(json, ok(value));
    assert.deepEqual(msgpack, ok(value));
  });
}

// --- waiting, concurrency, one-way ------------------------------------------------

test('client timeout rejects with CerbasTimeout', async () => {
  const started = Date.now();
  await assert.rejects(
    client.request('sleep', { ms: 3000 }, { timeoutMs: 500 }),
    (err) => err instanceof CerbasTimeout && /sleep/.test(err.message),
  );
  const took = Date.now() - started;
  assert.ok(took >= 450 && took < 2500, `took ${took} ms`);
  // The client still works afterwards.
  assert.deepEqual(await client.request('hello'), ok('hello world!'));
});

test('concurrent requests on one client get their own replies', async () => {
  const replies = await Promise.all(
    Array.from({ length: 50 }, (_, i) =>
      client.request('sum', { a: i, b: 1000 }, { msgpack: i % 2 === 1 }),
    ),
  );
  replies.forEach((reply, i) => assert.deepEqual(reply, ok(i + 1000)));
});

test('replies leave no subscription behind', async () => {
  const r = createClient({ url: redisSrv.url, RESP: 2 });
  await r.connect();
  try {
    await client.request('hello');
    await client.request('hello', null, { msgpack: true });
    const deadline = Date.now() + 5000;
    let channels;
    while ((channels = await r.pubSubChannels('*CERBAS-RESPONSE-*')).length > 0) {
      assert.ok(Date.now() < deadline, `still subscribed to ${channels}`);
      await sleep(20); // poll interval, bounded by the deadline
    }
  } finally {
    await r.close();
  }
});

test('a delayed request is answered after its delay', async () => {
  const started = Date.now();
  assert.deepEqual(await client.request('hello', null, { delay: 300 }), ok('hello world!'));
  const took = Date.now() - started;
  assert.ok(took >= 300, `took ${took} ms`);
});

test('one-way send of tally', async () => {
  assert.equal(JSON.parse(client.body('tally', { name: 'x' }, { reply: false })).reply, false);
  assert.equal(JSON.parse(client.body('tally', { name: 'x' })).reply, undefined);
  const name = `node-${process.pid}-${Date.now()}-send`;
  const r = createClient({ url: redisSrv.url, database: 1, RESP: 2 });
  await r.connect();
  const sub = r.duplicate();
  await sub.connect();
  const heard = [];
  try {
    // Listening on every reply channel: the one-way call must get nothing.
    await sub.pSubscribe('CERBAS-RESPONSE-1-*', (_message, channel) => heard.push(channel));
    const id = await client.send('tally', { name });
    assert.ok(Number.isInteger(id) && id > 0, `id ${id}`);
    const deadline = Date.now() + 10000;
    // Acknowledged (its key deleted) in the same step as a publish would be.
    while ((await r.get(`CERBAS-TALLY-${name}`)) !== '1' || (await r.exists(client.requestKey(id)))) {
      assert.ok(Date.now() < deadline, 'tally never reached 1, or no ack');
      await sleep(20); // poll interval, bounded by the deadline
    }
    await sleep(200); // time for a message already sent to arrive
    assert.ok(!heard.includes(client.replyChannel(id)), `heard ${heard}`);
  } finally {
    await sub.close();
    await r.close();
  }
});

test('halt stops a server of its own', async () => {
  const own = await startRedis(tmp);
  let server;
  try {
    server = await startCerbas(own.url, tmp);
    const c = new Client({ url: own.url, env: 'dev', user: 'foo', source: 'cerbastest' });
    try {
      assert.deepEqual(await c.request('halt', { delay: 200 }), ok(''));
    } finally {
      await c.close();
    }
    const code = await Promise.race([server.proc.exited, sleep(10000, 'still running', { ref: false })]);
    assert.equal(code, 0, `cerbas after halt: ${code}\n${logTail(server.log)}`);
  } finally {
    if (server) await stop(server.proc);
    await stop(own.proc);
  }
});

// Last, so that the calls earlier tests gave up on (sleep 3000) finish meanwhile
// and the server stops at once.
test('slow times out on the server', async () => {
  const started = Date.now();
  assert.deepEqual(await client.request('slow', null, { timeoutMs: 15000 }), error('timeout'));
  const took = Date.now() - started;
  assert.ok(took > 4000 && took < 12000, `took ${took} ms`);
});
