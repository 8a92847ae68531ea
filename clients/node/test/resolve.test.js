// Finding Redis (URL, env, database) and naming keys, without a server: the
// client connects only on its first request.

'use strict';

const { test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const { promisify } = require('node:util');

const { Client, resolve, urlDb } = require('..');

const saved = {};

beforeEach(() => {
  for (const k of ['CERBAS_REDIS_URL', 'CERBAS_ENV']) {
    saved[k] = process.env[k];
    delete process.env[k];
  }
});

afterEach(() => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

test('defaults: local Redis, env dev, db 1', () => {
  const c = new Client();
  assert.deepEqual([c.url, c.env, c.db], ['redis://127.0.0.1:6379', 'dev', 1]);
  assert.deepEqual([c.user, c.source, c.prefix, c.timeoutMs], ['test', 'test', 'CERBAS', 10000]);
});

test('names: ids zero-padded to 10 digits in keys and channels', () => {
  const c = new Client();
  assert.equal(c.counterKey(), 'CERBAS-COUNTER');
  assert.equal(c.queueKey(), 'CERBAS-QUEUE');
  assert.equal(c.requestKey(42), 'CERBAS-REQ-0000000042');
  assert.equal(c.replyChannel(42), 'CERBAS-RESPONSE-1-0000000042');
  assert.equal(c.replyChannel(42, true), 'MSGPACK:CERBAS-RESPONSE-1-0000000042');
  const p = new Client({ prefix: 'X', env: 'prod' });
  assert.equal(p.replyChannel(12345), 'X-RESPONSE-8-0000012345');
});

test('the request body', () => {
  const c = new Client({ user: 'foo', source: 'cerbastest' });
  assert.deepEqual(JSON.parse(c.body('sum', { a: 1, b: 2 })), {
    func: 'sum', args: { a: 1, b: 2 }, user: 'foo', source: 'cerbastest',
  });
  assert.deepEqual(JSON.parse(c.body('hello')), { func: 'hello', user: 'foo', source: 'cerbastest' });
  assert.deepEqual(JSON.parse(c.body('halt', null, { user: 'tom', source: 'web', delay: 60000 })), {
    func: 'halt', user: 'tom', source: 'web', delay: 60000,
  });
});

test('CERBAS_ENV=prod uses db 8', () => {
  process.env.CERBAS_ENV = 'prod';
  const c = new Client();
  assert.deepEqual([c.env, c.db], ['prod', 8]);
  assert.equal(c.replyChannel(7), 'CERBAS-RESPONSE-8-0000000007');
});

test('CERBAS_ENV=dev uses db 1', () => {
  process.env.CERBAS_ENV = 'dev';
  assert.equal(new Client().db, 1);
});

test('the db in the URL wins over the env', () => {
  process.env.CERBAS_REDIS_URL = 'redis://:secret@10.0.0.5:6380/3';
  process.env.CERBAS_ENV = 'prod';
  const c = new Client();
  assert.deepEqual([c.url, c.env, c.db], ['redis://:secret@10.0.0.5:6380/3', 'prod', 3]);
  assert.equal(new Client({ url: 'redis://h:1/0', env: 'prod' }).db, 0);
  assert.equal(new Client({ url: 'redis://h:1/5/', env: 'dev' }).db, 5);
});

test('a URL without a db (or with a bare slash) takes the env\'s', () => {
  assert.equal(new Client({ url: 'redis://h:1', env: 'prod' }).db, 8);
  assert.equal(new Client({ url: 'redis://h:1/', env: 'prod' }).db, 8);
  assert.equal(new Client({ url: 'redis://h:1/?x=1', env: 'dev' }).db, 1);
});

test('unix URLs name the db in the query', () => {
  assert.equal(urlDb('unix:///run/redis.sock?db=4'), 4);
  assert.equal(urlDb('redis+unix:///run/redis.sock?db=4'), 4);
  assert.equal(urlDb('unix:///run/redis.sock'), null);
  assert.equal(new Client({ url: 'unix:///run/redis.sock', env: 'prod' }).db, 8);
});

test('options win over the environment', () => {
  process.env.CERBAS_REDIS_URL = 'redis://10.0.0.5:6380/3';
  process.env.CERBAS_ENV = 'dev';
  const c = new Client({ url: 'redis://127.0.0.1:7000', env: 'prod' });
  assert.deepEqual([c.url, c.env, c.db], ['redis://127.0.0.1:7000', 'prod', 8]);
});

test('empty variables count as unset', () => {
  process.env.CERBAS_REDIS_URL = '';
  process.env.CERBAS_ENV = '';
  assert.deepEqual(resolve(), { url: 'redis://127.0.0.1:6379', env: 'dev', db: 1 });
});

test('any other env is an error', () => {
  process.env.CERBAS_ENV = 'staging';
  assert.throws(() => new Client(), /env must be dev or prod/);
  delete process.env.CERBAS_ENV;
  assert.throws(() => new Client({ env: 'test' }), /env must be dev or prod/);
  assert.throws(() => resolve(undefined, 'PROD'), /env must be dev or prod/);
});

test('a db that is not a number is an error', () => {
  assert.throws(() => new Client({ url: 'redis://127.0.0.1:6379/x' }), /no valid db/);
  assert.throws(() => new Client({ url: 'redis://127.0.0.1:6379/-1' }), /no valid db/);
  assert.throws(() => urlDb('unix:///run/redis.sock?db=one'), /no valid db/);
});

test('constructing a client does not connect: a program that only makes one exits', async () => {
  // A listener that accepts connections and never answers: a client that connected
  // would wait there for its handshake, and keep the program running.
  const accepted = [];
  const server = net.createServer((sock) => accepted.push(sock));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const url = `redis://127.0.0.1:${server.address().port}`;
    const program = `new (require(${JSON.stringify(path.resolve(__dirname, '..'))}).Client)({ url: ${JSON.stringify(url)} });`;
    const failed = await promisify(execFile)(process.execPath, ['-e', program], { timeout: 10000 })
      .then(() => null, (err) => err);
    assert.equal(failed, null, `the program did not exit by itself: ${failed?.killed ? 'killed after 10 s' : failed?.message}`);
    assert.equal(accepted.length, 0);
  } finally {
    for (const sock of accepted) sock.destroy();
    await new Promise((resolve) => server.close(resolve));
  }
});

test('an unreachable Redis: CerbasTimeout, and close() does not hang', async () => {
  const { CerbasTimeout } = require('..');
  const c = new Client({ url: 'redis://127.0.0.1:1', timeoutMs: 300 });
  await assert.rejects(c.request('hello'), (e) => e instanceof CerbasTimeout && /not connected/.test(e.message));
  await assert.rejects(c.send('hello'), CerbasTimeout);
  await c.close();
});

test('each new connection reuses one node-redis client class (building one costs 100+ ms)', async () => {
  // A look inside: the connections of successive attempts, and their classes.
  const c = new Client({ url: 'redis://127.0.0.1:1' });
  const classes = new Set();
  for (let i = 0; i < 3; i++) {
    const attempt = c._connect();
    const { session } = c._opening;
    for (const conn of [session.cmd, session.sub]) classes.add(Object.getPrototypeOf(conn).constructor);
    await assert.rejects(attempt, /ECONNREFUSED/);
  }
  assert.equal(classes.size, 1);
  await c.close();
});
