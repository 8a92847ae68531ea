// End-to-end tests of the client against a real redis-server and the cerbas binary
// (the example functions of src/functions.rs, configured by cerbas.toml).
//
// Needs /usr/bin/redis-server (or REDIS_SERVER) and a built server (`cargo build`
// at the repository root; or CERBAS_BIN). Run from clients/node: `npm test`.

'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { createClient } = require('redis');

const {
  Client, CerbasError, CerbasTimeout, CerbasConnectionError, CerbasClosedError,
  CerbasProtocolError, CerbasAbortError,
} = require('..');
const {
  assertCerbasError, clientConnections, dropLogs, later, now, logTail, ok, running, settled, startCerbas, startRedis, stop,
  waitFor,
} = require('./helpers');

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
  dropLogs(tmp);
});

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
  const started = now();
  await assert.rejects(
    client.request('sleep', { ms: 3000 }, { timeoutMs: 500 }),
    (err) => assertCerbasError(err, CerbasTimeout) && /sleep/.test(err.message),
  );
  const took = now() - started;
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

test('16 callers share one client, each gets its own replies', async () => {
  const callers = 16;
  const rounds = 15;
  const got = await Promise.all(
    Array.from({ length: callers }, async (_, caller) => {
      const replies = [];
      for (let round = 0; round < rounds; round++) {
        const message = `caller ${caller} round ${round}`;
        const msgpack = (caller + round) % 3 === 0;
        replies.push([message, await client.request('echo', { message }, { msgpack })]);
      }
      return replies;
    }),
  );
  assert.equal(got.flat().length, callers * rounds);
  for (const [message, reply] of got.flat()) assert.deepEqual(reply, ok(message));
});

test('ids come in blocks: one INCRBY per 100 requests', async () => {
  const c = new Client({ url: redisSrv.url, env: 'dev' });
  const r = createClient({ url: redisSrv.url, database: 1, RESP: 2 });
  await r.connect();
  try {
    // Counted by Redis (cron, in the server, takes ids with INCR meanwhile).
    const incrbys = async () => Number(/cmdstat_incrby:calls=(\d+)/.exec(await r.info('commandstats'))?.[1] ?? 0);
    const before = await incrbys();
    const replies = await Promise.all(Array.from({ length: 150 }, () => c.request('dummy')));
    replies.forEach((reply) => assert.deepEqual(reply, ok(null)));
    assert.equal(await incrbys() - before, 2);
  } finally {
    await r.close();
    await c.close();
  }
});

test('abort via signal: at once, with CerbasAbortError; the client goes on', async () => {
  const controller = new AbortController();
  const started = now();
  const call = client.request('sleep', { ms: 3000 }, { signal: controller.signal });
  setTimeout(() => controller.abort(new Error('user left')), 100);
  await assert.rejects(call, (err) => {
    assert.ok(err instanceof CerbasAbortError && err instanceof CerbasError, String(err));
    assert.equal(err.name, 'AbortError');
    assert.equal(err.cause.message, 'user left');
    return true;
  });
  assert.ok(now() - started < 1000, `took ${now() - started} ms`);
  // An aborted signal rejects before anything is sent.
  await assert.rejects(client.request('hello', null, { signal: AbortSignal.abort() }), CerbasAbortError);
  await assert.rejects(client.send('tally', { name: 'x' }, { signal: AbortSignal.abort() }), CerbasAbortError);
  // A signal that never fires changes nothing (and its listener is removed).
  const idle = new AbortController();
  assert.deepEqual(await client.request('hello', null, { signal: idle.signal }), ok('hello world!'));
  idle.abort();
  assert.deepEqual(await client.request('hello'), ok('hello world!'));
});

test('close() rejects calls in flight at once, and every call after it, and closes the connections', async () => {
  const r = createClient({ url: redisSrv.url, database: 1, RESP: 2 });
  await r.connect();
  const c = new Client({ url: redisSrv.url, env: 'dev', timeoutMs: 20000 });
  const connecting = new Client({ url: redisSrv.url, env: 'dev' });
  try {
    // The shared client's connections, which stay open.
    const others = (await clientConnections(r)).length;
    assert.deepEqual(await c.request('hello'), ok('hello world!'));
    assert.equal((await clientConnections(r)).length, others + 2);
    const calls = Array.from({ length: 5 }, () => later(c.request('sleep', { ms: 3000 })));
    const first = later(connecting.request('hello'));
    await connecting.close(); // while it connects
    await waitFor('5 requests queued', async () => (await r.keys('CERBAS-REQ-*')).length >= 5);
    const started = now();
    await c.close();
    for (const p of [...calls, first]) await assert.rejects(p, (e) => assertCerbasError(e, CerbasClosedError));
    assert.ok(now() - started < 500, `took ${now() - started} ms`);
    await assert.rejects(c.request('hello'), (e) => assertCerbasError(e, CerbasClosedError) && e instanceof CerbasConnectionError);
    await assert.rejects(c.send('tally', { name: 'x' }), CerbasClosedError);
    assert.ok(c.closed);
    // Both clients' connections are gone from Redis; nothing reconnected them.
    await waitFor('the connections closed', async () => (await clientConnections(r)).length === others);
    await c.close(); // twice is fine
  } finally {
    await c.close();
    await connecting.close();
    await r.close();
  }
});

test('bad options are TypeErrors, before anything is sent', async () => {
  await assert.rejects(client.request(''), TypeError);
  await assert.rejects(client.request(42), TypeError);
  await assert.rejects(client.request('hello', null, { timeoutMs: 0 }), TypeError);
  await assert.rejects(client.request('hello', null, { timeoutMs: 'soon' }), TypeError);
  await assert.rejects(client.request('hello', null, { delay: -1 }), TypeError);
  await assert.rejects(client.send('hello', null, { delay: 1.5 }), TypeError);
  assert.throws(() => new Client({ timeoutMs: -5 }), TypeError);
});

// --- replies by hand: a prefix no server reads, replies published by the test ----

/** A client on a queue nobody serves, and a connection to answer it by hand. */
async function byHand(fn) {
  const prefix = `NODETEST${process.pid}`;
  const c = new Client({ url: redisSrv.url, env: 'dev', prefix, timeoutMs: 5000 });
  const r = createClient({ url: redisSrv.url, database: 1, RESP: 2 });
  await r.connect();
  // The ids queued so far, once the client has pushed them.
  const queued = async (n) => {
    let ids;
    const deadline = now() + 5000;
    while ((ids = await r.lRange(c.queueKey(), 0, -1)).length < n) {
      assert.ok(now() < deadline, `only ${ids.length} of ${n} requests queued`);
      await sleep(5); // poll interval, bounded by the deadline
    }
    return ids.map(Number);
  };
  try {
    await fn(c, r, queued);
  } finally {
    await r.del([c.queueKey(), c.counterKey()]);
    await r.close();
    await c.close();
  }
}

test('two waiters on one channel: one leaving does not drop the other', async () => {
  await byHand(async (c, r, queued) => {
    // Ids are unique per client, so this takes a look inside: the second call is
    // given the first one's id.
    const first = later(c.request('a', null, { timeoutMs: 1500 }));
    const [id] = await queued(1);
    c._block.next = id;
    const second = c.request('b');
    await queued(2);
    await assert.rejects(first, (e) => assertCerbasError(e, CerbasTimeout)); // leaves; the channel must stay
    const channel = c.replyChannel(id);
    assert.deepEqual(await r.pubSubNumSub(channel), { [channel]: 1 });
    assert.equal(await r.publish(channel, '{"status":"ok","data":"second"}'), 1);
    assert.deepEqual(await second, ok('second'));
    await waitFor('the unsubscribe', async () => (await r.pubSubNumSub(channel))[channel] === 0);
  });
});

// A reply published before the client's SUBSCRIBE is confirmed would be lost (the
// server republishes only a reply nobody heard, after 5 s). The client subscribes
// and waits for Redis's confirmation before it queues the request, so this cannot
// happen on a live connection; a lost one is faults.test.js's case.
test('subscribe before push: a reply published the moment the request is queued is heard, even with SUBSCRIBE slow', async () => {
  await byHand(async (c, r) => {
    // Connects, and subscribes nothing ahead (a one-way call does not).
    await c.send('warm-up');
    await r.del(c.queueKey());
    // Every SUBSCRIBE of this client's connection reaches Redis 300 ms late (a
    // delay injected, not a wait): a push not waiting for it would come first.
    const sub = c._session.sub;
    const subscribe = sub.subscribe.bind(sub);
    sub.subscribe = (...args) => sleep(300).then(() => subscribe(...args));
    const server = r.duplicate();
    await server.connect();
    try {
      const call = later(c.request('a'));
      // The test is the server, answering as soon as the id is queued.
      const popped = await server.blPop(c.queueKey(), 5);
      assert.ok(popped, 'nothing queued within 5 s');
      const receivers = await r.publish(c.replyChannel(Number(popped.element)), JSON.stringify(ok('at once')));
      assert.equal(receivers, 1, 'the reply was published before the client subscribed');
      assert.deepEqual(await call, ok('at once'));
    } finally {
      await server.close();
    }
  });
});

test('delay: the default timeout grows by it', async () => {
  await byHand(async (c, r, queued) => {
    c.timeoutMs = 200;
    const started = now();
    const delayed = settled(c.request('a', null, { delay: 300 }));
    const id = (await queued(1))[0];
    assert.equal(JSON.parse(await r.get(c.requestKey(id))).delay, 300);
    const { reason } = await delayed;
    assertCerbasError(reason, CerbasTimeout);
    assert.match(reason.message, /within 500 ms/);
    assert.ok(now() - started >= 450, `took ${now() - started} ms`);
    await assert.rejects(c.request('a', null, { delay: 300, timeoutMs: 100 }), /within 100 ms/);
  });
});

test('a reply repeated (a republish) resolves once; a reply not JSON is a CerbasProtocolError', async () => {
  await byHand(async (c, r, queued) => {
    const calls = [c.request('a'), c.request('b'), c.request('c', null, { msgpack: true })].map(later);
    // By the func in each body: the queue's order need not be the calls' order.
    const idOf = {};
    for (const id of await queued(3)) idOf[JSON.parse(await r.get(c.requestKey(id))).func] = id;
    const [a, b, m] = ['a', 'b', 'c'].map((func) => c.replyChannel(idOf[func], func === 'c'));
    await r.publish(a, '{"status":"ok","data":1}');
    await r.publish(a, '{"status":"ok","data":2}');
    await r.publish(b, 'not json');
    await r.publish(m, Buffer.from([0xc1]));
    const [ra, rb, rm] = await Promise.allSettled(calls);
    assert.deepEqual(ra.value, ok(1), String(ra.reason));
    assertCerbasError(rb.reason, CerbasProtocolError, 'the JSON reply\'s');
    assert.match(rb.reason.message, /not JSON/);
    assertCerbasError(rm.reason, CerbasProtocolError, 'the msgpack reply\'s');
    assert.match(rm.reason.message, /not msgpack/);
  });
});

test('concurrent callers of one client never get each other\'s replies', async () => {
  await byHand(async (c, r, queued) => {
    const n = 40;
    const calls = Array.from({ length: n }, (_, i) => c.request(`f${i}`, null, { msgpack: i % 2 === 1 }));
    const ids = await queued(n);
    const bodies = await Promise.all(ids.map((id) => r.get(c.requestKey(id))));
    // Answer in reverse order, each with the func its body names.
    for (let i = n - 1; i >= 0; i--) {
      const { func } = JSON.parse(bodies[i]);
      const msgpack = Number(func.slice(1)) % 2 === 1;
      const reply = msgpack
        ? Buffer.from([0x82, 0xa6, ...Buffer.from('status'), 0xa2, ...Buffer.from('ok'), 0xa4, ...Buffer.from('data'), 0xd9, func.length, ...Buffer.from(func)])
        : JSON.stringify(ok(func));
      assert.equal(await r.publish(c.replyChannel(ids[i], msgpack), reply), 1);
    }
    (await Promise.all(calls)).forEach((reply, i) => assert.deepEqual(reply, ok(`f${i}`)));
  });
});

test('replies leave no subscription behind but the next id\'s; close() leaves none', async () => {
  const r = createClient({ url: redisSrv.url, RESP: 2 });
  await r.connect();
  const c = new Client({ url: redisSrv.url, env: 'dev' });
  // Channels of this client's (the shared client holds one of its own).
  const others = new Set(await r.pubSubChannels('*CERBAS-RESPONSE-*'));
  const subscribed = async () => (await r.pubSubChannels('*CERBAS-RESPONSE-*')).filter((ch) => !others.has(ch));
  try {
    await c.request('hello');
    await c.request('hello', null, { msgpack: true });
    await c.send('tally', { name: `node-${process.pid}-subs` });
    await c.request('hello');
    // Only the channel of the id a next request will take, subscribed ahead.
    const next = c.replyChannel(c._block.next);
    await waitFor('one channel left', async () => {
      const channels = await subscribed();
      return channels.length === 1 && channels[0] === next;
    });
    // One-way and msgpack calls drop it, and subscribe none ahead.
    await c.send('tally', { name: `node-${process.pid}-subs` });
    await c.request('hello', null, { msgpack: true });
    await waitFor('no channel left', async () => (await subscribed()).length === 0);
    await c.request('hello');
    await c.close();
    await waitFor('no channel left after close()', async () => (await subscribed()).length === 0);
  } finally {
    await c.close();
    await r.close();
  }
});

test('a delayed request is answered after its delay', async () => {
  const started = now();
  assert.deepEqual(await client.request('hello', null, { delay: 300 }), ok('hello world!'));
  const took = now() - started;
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
    const deadline = now() + 10000;
    // Acknowledged (its key deleted) in the same step as a publish would be.
    while ((await r.get(`CERBAS-TALLY-${name}`)) !== '1' || (await r.exists(client.requestKey(id)))) {
      assert.ok(now() < deadline, 'tally never reached 1, or no ack');
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
  const started = now();
  assert.deepEqual(await client.request('slow', null, { timeoutMs: 15000 }), error('timeout'));
  const took = now() - started;
  assert.ok(took > 4000 && took < 12000, `took ${took} ms`);
});
