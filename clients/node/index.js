/**
 * A Node.js client for cerbas, the job server (wire protocol: docs/PROTOCOL.md).
 *
 * A client needs nothing but Redis. To call a function it
 *
 * 1. `INCR P-COUNTER` to get a request id;
 * 2. subscribes, on a second connection, to the reply channel
 *    `P-RESPONSE-{db}-{id:010}` (or `MSGPACK:P-RESPONSE-{db}-{id:010}` for a msgpack
 *    reply) and waits until Redis confirms the subscription;
 * 3. `SET P-REQ-{id:010}` to the JSON body `{func, args, user, source}` and
 *    `RPUSH P-QUEUE id` (pipelined, in that order);
 * 4. waits, up to its timeout, for the one message on that channel:
 *    `{status: "ok", data}` or `{status: "error", data: "message"}`; then
 *    unsubscribes.
 *
 * Redis is found as the server finds it: the URL is the option, else
 * `CERBAS_REDIS_URL`, else `redis://127.0.0.1:6379` (a password goes in the URL:
 * `redis://:secret@host:6379`); the database is the one the URL names
 * (`redis://host:6379/3`, or `?db=3` for `unix://`), else 1 for env `dev` and 8 for
 * `prod` (env is the option, else `CERBAS_ENV`, else `dev`; any other env is an
 * error).
 *
 * Example:
 *
 *     const { Client, CerbasTimeout } = require('cerbas-client');
 *
 *     const c = new Client({ user: 'foo', source: 'cerbastest' });
 *     await c.request('hello');                      // { status: 'ok', data: 'hello world!' }
 *     await c.request('sum', { a: 1, b: 2 });        // { status: 'ok', data: 3 }
 *     await c.request('hello', null, { msgpack: true }); // same reply, sent as msgpack
 *     await c.send('tally', { name: 'x' });          // one-way (no reply published); the id
 *     try {
 *       await c.request('sleep', { ms: 3000 }, { timeoutMs: 500 });
 *     } catch (e) {
 *       if (!(e instanceof CerbasTimeout)) throw e;
 *     }
 *     await c.close();
 *
 * Connections are opened on first use (two: commands and subscriptions) and shared
 * by concurrent requests. Redis connection errors are emitted as `'error'` events
 * on the client when it has listeners (they also reject or time out the requests
 * they affect). Dependencies: `redis` (node-redis) and `@msgpack/msgpack`.
 */

'use strict';

const { EventEmitter } = require('node:events');
const { createClient } = require('redis');
const { decode } = require('@msgpack/msgpack');

const DEFAULT_URL = 'redis://127.0.0.1:6379';
const DEFAULT_ENV = 'dev';
const DEFAULT_PREFIX = 'CERBAS';
const DEFAULT_TIMEOUT_MS = 10000;
const ENV_DBS = { dev: 1, prod: 8 };

/** No reply arrived (or the request could not be queued) within its timeout. */
class CerbasTimeout extends Error {
  constructor(message) {
    super(message);
    this.name = 'CerbasTimeout';
  }
}

/**
 * The database a Redis URL names, or null: the path of `redis://h:p/3`, or `db=`
 * in the query of a `unix://` URL (as the server reads it).
 */
function urlDb(url) {
  const q = url.indexOf('?');
  const rest = q < 0 ? url : url.slice(0, q);
  const query = q < 0 ? '' : url.slice(q + 1);
  let text;
  if (url.startsWith('unix:') || url.startsWith('redis+unix:')) {
    text = new URLSearchParams(query).get('db') ?? '';
  } else {
    const afterScheme = rest.includes('://') ? rest.slice(rest.indexOf('://') + 3) : rest;
    const slash = afterScheme.indexOf('/');
    text = slash < 0 ? '' : afterScheme.slice(slash + 1).replace(/\/+$/, '');
  }
  if (text === '') return null;
  if (!/^\d+$/.test(text)) throw new Error(`redis URL names no valid db: ${JSON.stringify(text)}`);
  return Number(text);
}

/** Returns `{url, env, db}` as the server would choose them. */
function resolve(url, env) {
  url = url || process.env.CERBAS_REDIS_URL || DEFAULT_URL;
  env = env || process.env.CERBAS_ENV || DEFAULT_ENV;
  if (!Object.hasOwn(ENV_DBS, env)) {
    throw new Error(`env must be dev or prod, not ${JSON.stringify(env)}`);
  }
  const db = urlDb(url) ?? ENV_DBS[env];
  return { url, env, db };
}

/**
 * A connection to one cerbas deployment: a Redis URL, a database, a prefix.
 *
 * `user` and `source` are sent with every request unless a call names others; they
 * must be registered in the server's configuration. `timeoutMs` is how long a
 * request waits for its reply unless a call names another.
 */
class Client extends EventEmitter {
  constructor({
    url,
    env,
    prefix = DEFAULT_PREFIX,
    user = 'test',
    source = 'test',
    timeoutMs = DEFAULT_TIMEOUT_MS,
  } = {}) {
    super();
    Object.assign(this, resolve(url, env));
    this.prefix = prefix;
    this.user = user;
    this.source = source;
    this.timeoutMs = timeoutMs;
    this.redis = null; // the command connection, once connected
    this.subscriber = null; // the subscription connection, once connected
    this._connecting = null;
  }

  // Key and channel names (docs/PROTOCOL.md).

  counterKey() {
    return `${this.prefix}-COUNTER`;
  }

  queueKey() {
    return `${this.prefix}-QUEUE`;
  }

  requestKey(id) {
    return `${this.prefix}-REQ-${pad(id)}`;
  }

  replyChannel(id, msgpack = false) {
    const channel = `${this.prefix}-RESPONSE-${this.db}-${pad(id)}`;
    return msgpack ? `MSGPACK:${channel}` : channel;
  }

  /**
   * The JSON request body, as a string. `reply: false` tells the server to publish
   * no reply (a one-way call).
   */
  body(func, args, { user, source, delay, reply } = {}) {
    const d = { func };
    if (args !== undefined && args !== null) d.args = args;
    d.user = user ?? this.user;
    d.source = source ?? this.source;
    if (delay !== undefined && delay !== null) d.delay = delay;
    if (reply === false) d.reply = false;
    return JSON.stringify(d);
  }

  /**
   * Calls `func` with `args` (an object) and resolves to the reply
   * `{status: "ok" | "error", data}`. Options: `msgpack` (ask for a msgpack reply),
   * `user`, `source`, `delay` (ms) and `timeoutMs` (default: the client's). Rejects
   * with CerbasTimeout when no reply arrives in time.
   */
  async request(func, args, { msgpack = false, timeoutMs = this.timeoutMs, ...opts } = {}) {
    const body = this.body(func, args, opts);
    let id = null;
    let subscriber = null;
    let subscribing = null;
    let timer;
    const expired = new Promise((_, reject) => {
      timer = setTimeout(() => {
        const what = id === null ? 'not connected to Redis' : `request ${id}`;
        reject(new CerbasTimeout(`no reply to ${func} (${what}) within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    const within = (promise) => Promise.race([promise, expired]);
    try {
      await within(this._connect());
      id = await within(this.redis.incr(this.counterKey()));
      const channel = this.replyChannel(id, msgpack);
      let deliver;
      const message = new Promise((res) => (deliver = res));
      // Resolves once Redis has confirmed the subscription; a repeated reply (a
      // republish) calls `deliver` again, harmlessly.
      subscriber = this.subscriber;
      subscribing = subscriber.subscribe(channel, deliver, msgpack);
      await within(subscribing);
      await within(this._push(id, body));
      const raw = await within(message);
      return msgpack ? decode(raw) : JSON.parse(raw);
    } finally {
      clearTimeout(timer);
      if (subscribing) {
        const channel = this.replyChannel(id, msgpack);
        subscribing.then(() => subscriber.unsubscribe(channel)).catch(() => {});
      }
    }
  }

  /**
   * Queues a one-way call (nobody waits for its reply, and the server publishes
   * none: the body says `"reply": false`) and resolves to its id.
   * Options: `user`, `source`, `delay`, `timeoutMs` (for queueing it; on
   * CerbasTimeout the request may still be queued later, once Redis answers).
   */
  async send(func, args, { timeoutMs = this.timeoutMs, ...opts } = {}) {
    const body = this.body(func, args, { ...opts, reply: false });
    let timer;
    const expired = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new CerbasTimeout(`could not queue ${func} within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    const queue = async () => {
      await this._connect();
      const id = await this.redis.incr(this.counterKey());
      await this._push(id, body);
      return id;
    };
    try {
      return await Promise.race([queue(), expired]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Closes both connections (waiting for commands in flight). */
  async close() {
    const connecting = this._connecting;
    const conns = [this.redis, this.subscriber].filter(Boolean);
    this._connecting = null;
    this.redis = this.subscriber = null;
    if (!connecting) return;
    await Promise.all(
      conns.map(async (conn) => {
        if (conn.isReady) {
          await conn.close();
        } else if (conn.isOpen) {
          conn.destroy(); // still trying to (re)connect: give up
        }
      }),
    );
  }

  // SET the body, then RPUSH the id: two commands on one connection, sent together.
  _push(id, body) {
    return Promise.all([
      this.redis.set(this.requestKey(id), body),
      this.redis.rPush(this.queueKey(), String(id)),
    ]);
  }

  // Opens both connections, once; they reconnect by themselves if Redis goes away.
  _connect() {
    if (!this._connecting) {
      // node-redis spells `redis+unix:` as `unix:`. RESP2 works with every Redis
      // version, as the server does.
      const url = this.url.replace(/^redis\+unix:/, 'unix:');
      const redis = createClient({ url, database: this.db, RESP: 2 });
      const subscriber = redis.duplicate();
      const onError = (err) => {
        if (this.listenerCount('error') > 0) this.emit('error', err);
      };
      redis.on('error', onError);
      subscriber.on('error', onError);
      const connecting = Promise.all([redis.connect(), subscriber.connect()]);
      this.redis = redis;
      this.subscriber = subscriber;
      this._connecting = connecting;
      // node-redis retries a refused connection by itself; should connecting fail
      // for good (e.g. a wrong password), start afresh on the next call.
      connecting.catch(() => {
        for (const conn of [redis, subscriber]) if (conn.isOpen) conn.destroy();
        if (this._connecting === connecting) {
          this._connecting = this.redis = this.subscriber = null;
        }
      });
    }
    return this._connecting;
  }
}

function pad(id) {
  return String(id).padStart(10, '0');
}

module.exports = { CerbasTimeout, Client, resolve, urlDb, DEFAULT_URL, DEFAULT_ENV, DEFAULT_PREFIX };
