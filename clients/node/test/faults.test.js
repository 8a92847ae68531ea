// The client under faults, each test with a redis-server (and a cerbas server) of
// its own: Redis restarted with calls in flight (and the counter set back), a
// subscriber connection lost while the reply is published, Redis frozen (SIGSTOP),
// Redis refusing a command. Not for the ordinary calls: cerbas.test.js.

'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { createClient } = require('redis');

const {
  Client, CerbasError, CerbasTimeout, CerbasConnectionError, CerbasProtocolError, ID_BLOCK,
} = require('..');
const {
  assertCerbasError, clientConnections, dropLogs, later, now, ok, settled, startCerbas, startProxy, startRedis, stop, waitFor,
} = require('./helpers');

let tmp;

before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cerbas-node-faults-'));
});

after(() => dropLogs(tmp));

/** A plain connection to db 1 of `url`, for looking at and changing Redis. */
async function plain(url) {
  const r = createClient({ url, database: 1, RESP: 2 });
  r.on('error', () => {}); // Redis goes away in these tests
  await r.connect();
  return r;
}

/** Runs `fn` with a Redis, a cerbas server on it and a plain connection; stops them. */
async function withServer(fn) {
  const redis = await startRedis(tmp);
  const procs = { redis, server: null };
  let r;
  try {
    procs.server = await startCerbas(redis.url, tmp);
    r = await plain(redis.url);
    await fn(procs, r);
  } finally {
    if (r) r.destroy();
    await stop(procs.server?.proc);
    if (procs.redis.proc.signalCode === null) procs.redis.proc.kill('SIGCONT');
    await stop(procs.redis.proc);
  }
}

test('Redis restarted, counter set back, before the client reconnects: calls in flight fail, never get the new requests\' replies', async () => {
  await withServer(async (procs, r) => {
    const proxy = await startProxy(procs.redis.port);
    const a = new Client({ url: proxy.url, env: 'dev', timeoutMs: 20000 });
    const errors = [];
    a.on('error', (e) => errors.push(e));
    let b;
    try {
      assert.deepEqual(await a.request('hello'), ok('hello world!'));
      const counter = Number(await r.get('CERBAS-COUNTER'));
      const inflight = Array.from({ length: 3 }, () => later(a.request('sleep', { ms: 4800 })));
      await waitFor('3 requests queued', async () => (await r.keys('CERBAS-REQ-*')).length >= 3);

      // Restart Redis on the same port with the counter back where it was: the
      // next ids handed out are the ones `a` waits on. `a` cannot reconnect yet.
      proxy.hold = true;
      procs.redis.proc.kill('SIGKILL');
      await procs.redis.proc.exited;
      procs.redis = await startRedis(tmp, procs.redis.port);
      const r2 = await plain(procs.redis.url);
      await r2.set('CERBAS-COUNTER', String(counter - ID_BLOCK)); // before `a` took its block
      r2.destroy();

      // `a` reconnects and must fail its calls in flight at once; meanwhile another
      // process takes the same ids, and the server (reconnected) answers them: a
      // client that re-subscribed its channels would get those replies.
      assert.ok(proxy.held() > 0, 'a did not try to reconnect');
      const released = now();
      proxy.release();
      b = new Client({ url: procs.redis.url, env: 'dev', timeoutMs: 20000 });
      // Marked handled: an assertion failing before it is awaited is the failure.
      const bReplies = later(Promise.all(
        // Delayed, so that they are answered after `a` has reconnected.
        Array.from({ length: 10 }, (_, i) => b.request('echo', { message: `B-${i}` }, { delay: 1500 })),
      ));
      for (const outcome of await Promise.all(inflight.map(settled))) {
        assert.ok(!('value' in outcome), `a call in flight resolved with ${JSON.stringify(outcome.value)}`);
        assertCerbasError(outcome.reason, CerbasConnectionError);
        assert.match(outcome.reason.message, /restarted/);
      }
      assert.ok(now() - released < 2000, `failed ${now() - released} ms after reconnecting`);
      (await bReplies).forEach((reply, i) => assert.deepEqual(reply, ok(`B-${i}`)));

      // `a` goes on with ids of its own, beside `b`.
      const [mine, theirs] = await Promise.all([
        Promise.all(Array.from({ length: 10 }, (_, i) => a.request('echo', { message: `A-${i}` }))),
        Promise.all(Array.from({ length: 10 }, (_, i) => b.request('echo', { message: `B2-${i}` }))),
      ]);
      mine.forEach((reply, i) => assert.deepEqual(reply, ok(`A-${i}`)));
      theirs.forEach((reply, i) => assert.deepEqual(reply, ok(`B2-${i}`)));
      assert.ok(errors.length > 0, 'no \'error\' event');
      for (const e of errors) assertCerbasError(e, CerbasConnectionError, 'an \'error\' event');
    } finally {
      await a.close();
      if (b) await b.close();
      await proxy.close();
    }
  });
});

test('Redis killed with calls in flight: they fail at once; the client works again once Redis is back', async () => {
  await withServer(async (procs) => {
    const a = new Client({ url: procs.redis.url, env: 'dev', timeoutMs: 20000 });
    try {
      assert.deepEqual(await a.request('hello'), ok('hello world!'));
      const inflight = Array.from({ length: 3 }, () => later(a.request('sleep', { ms: 4800 })));
      const sending = later(a.send('sleep', { ms: 1 }));
      const r = await plain(procs.redis.url);
      await waitFor('3 requests queued', async () => (await r.keys('CERBAS-REQ-*')).length >= 3);
      r.destroy();
      const killed = now();
      procs.redis.proc.kill('SIGKILL');
      for (const outcome of await Promise.all(inflight.map(settled))) {
        assertCerbasError(outcome.reason, CerbasConnectionError, `a call in flight (${JSON.stringify(outcome.value)})`);
      }
      assert.ok(now() - killed < 2000, `failed ${now() - killed} ms after the kill`);
      const sent = await settled(sending);
      assert.ok(Number.isInteger(sent.value) || sent.reason instanceof CerbasError, String(sent.reason));

      // While Redis is down: the caller's timeout, not a raw library error.
      await procs.redis.proc.exited;
      await assert.rejects(a.request('hello', null, { timeoutMs: 1500 }), (e) => {
        assertCerbasError(e, CerbasTimeout);
        assert.match(e.message, /not connected/);
        assertCerbasError(e.cause, CerbasConnectionError, 'its cause');
        assert.match(e.cause.message, /ECONNREFUSED/);
        return true;
      });
      // A call made while Redis is down succeeds once it is back (within its timeout).
      const waiting = a.request('echo', { message: 'after' });
      procs.redis = await startRedis(tmp, procs.redis.port);
      assert.deepEqual(await waiting, ok('after'));
    } finally {
      await a.close();
    }
  });
});

test('the subscriber connection lost, the reply published meanwhile: the same Redis, so it arrives (republished)', async () => {
  await withServer(async (procs, r) => {
    const proxy = await startProxy(procs.redis.port);
    const a = new Client({ url: proxy.url, env: 'dev', timeoutMs: 10000 });
    try {
      assert.deepEqual(await a.request('hello'), ok('hello world!'));
      const call = settled(a.request('sleep', { ms: 300 }));
      const [key] = await waitFor('the request queued', async () => {
        const keys = await r.keys('CERBAS-REQ-*');
        return keys.length > 0 && keys;
      });
      proxy.hold = true;
      const subs = await clientConnections(r, 'cerbas-node-sub');
      const ids = subs.map((l) => /^id=(\d+)/.exec(l)[1]);
      assert.equal(ids.length, 1, subs.join('\n'));
      await r.sendCommand(['CLIENT', 'KILL', 'ID', ids[0]]);
      // The server answers (and deletes the request) while nobody listens (the
      // client's new connections are held by the proxy, never reaching Redis): the
      // reply can reach `a` only by the server's republish to a late subscriber.
      await waitFor('the reply', async () => !(await r.exists(key)));
      assert.ok(proxy.held() > 0, 'the client did not try to reconnect');
      proxy.release();
      const outcome = await call;
      assert.deepEqual(outcome.value, ok(300), String(outcome.reason));
    } finally {
      await a.close();
      await proxy.close();
    }
  });
});

test('Redis frozen (SIGSTOP): every caller\'s timeout holds', async () => {
  await withServer(async (procs) => {
    const a = new Client({ url: procs.redis.url, env: 'dev' });
    const fresh = new Client({ url: procs.redis.url, env: 'dev' });
    try {
      assert.deepEqual(await a.request('hello'), ok('hello world!'));
      procs.redis.proc.kill('SIGSTOP');
      // From before the call: its deadline covers what it does synchronously too
      // (a process's first connection builds node-redis's command table).
      const timed = async (call) => {
        const started = now();
        const outcome = await settled(call());
        return { ...outcome, took: now() - started };
      };
      const outcomes = await Promise.all([
        timed(() => a.request('hello', null, { timeoutMs: 1000 })),
        timed(() => a.send('tally', { name: 'frozen' }, { timeoutMs: 1000 })),
        timed(() => fresh.request('hello', null, { timeoutMs: 1000 })),
        timed(() => a.request('hello', null, { timeoutMs: 1500 })),
      ]);
      procs.redis.proc.kill('SIGCONT');
      outcomes.forEach(({ reason, value, took }, i) => {
        const want = i === 3 ? 1500 : 1000;
        assertCerbasError(reason, CerbasTimeout, `call ${i} (${JSON.stringify(value)})`);
        assert.ok(Math.abs(took - want) <= 500, `call ${i} took ${took} ms, asked for ${want}: ${reason?.message}`);
      });
      // Thawed, both clients work.
      assert.deepEqual(await a.request('hello'), ok('hello world!'));
      assert.deepEqual(await fresh.request('hello'), ok('hello world!'));
    } finally {
      procs.redis.proc.kill('SIGCONT');
      await a.close();
      await fresh.close();
    }
  });
});

test('Redis refusing a command (the counter is not a number): CerbasProtocolError', async () => {
  const redis = await startRedis(tmp);
  const c = new Client({ url: redis.url, env: 'dev', timeoutMs: 2000 });
  try {
    const r = await plain(redis.url);
    await r.set('CERBAS-COUNTER', 'not a number');
    r.destroy();
    const started = now();
    await assert.rejects(c.request('hello'), (e) => assertCerbasError(e, CerbasProtocolError) && /Redis answered ERR/.test(e.message));
    await assert.rejects(c.send('hello'), (e) => assertCerbasError(e, CerbasProtocolError));
    assert.ok(now() - started < 1000, `took ${now() - started} ms`);
  } finally {
    await c.close();
    await stop(redis.proc);
  }
});

test('Redis refusing the connection (a password is needed, no such db): CerbasProtocolError at once', async () => {
  const redis = await startRedis(tmp, null, ['--requirepass', 'sesame']);
  const clients = [
    new Client({ url: redis.url, env: 'dev', timeoutMs: 10000 }),
    new Client({ url: `redis://:wrong@127.0.0.1:${redis.port}`, env: 'dev', timeoutMs: 10000 }),
    new Client({ url: `redis://:sesame@127.0.0.1:${redis.port}/99`, env: 'dev', timeoutMs: 10000 }),
  ];
  try {
    for (const c of clients) {
      const started = now();
      await assert.rejects(c.request('hello'), (e) => assertCerbasError(e, CerbasProtocolError) && /connecting to Redis: Redis answered/.test(e.message));
      await assert.rejects(c.send('hello'), (e) => assertCerbasError(e, CerbasProtocolError));
      // Not retried until the deadline (10 s): one failed handshake each.
      assert.ok(now() - started < 5000, `took ${now() - started} ms`);
    }
    // The right password gets as far as the (empty) queue: queued, no server.
    const good = new Client({ url: `redis://:sesame@127.0.0.1:${redis.port}`, env: 'dev' });
    clients.push(good);
    assert.ok(Number.isInteger(await good.send('hello')));
  } finally {
    for (const c of clients) await c.close();
    await stop(redis.proc);
  }
});
