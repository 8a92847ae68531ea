/**
 * A Node.js client for cerbas, the job server (wire protocol: docs/PROTOCOL.md).
 * Not for: running a server, or talking to Redis about anything but cerbas requests.
 *
 * One `Client` object keeps two Redis connections, opened on first use and shared by
 * every call made on it: one for commands, one for subscriptions. To call a function:
 *
 * 1. an id from a block the client reserved with `INCRBY P-COUNTER 100` (one round
 *    trip per 100 calls; ids only need to be unique);
 * 2. `SUBSCRIBE` to the reply channel `P-RESPONSE-{db}-{id:010}` (or
 *    `MSGPACK:P-RESPONSE-{db}-{id:010}`) on the shared subscriber connection, and
 *    wait until Redis confirms it (subscribe before push: the reply is published once).
 *    The JSON channel of the next id is subscribed ahead, while the call before runs,
 *    so that a sequential caller does not wait for this;
 * 3. `SET P-REQ-{id:010}` the JSON body and `RPUSH P-QUEUE id`, sent together;
 * 4. the one message on that channel resolves the call, `{status: "ok", data}` or
 *    `{status: "error", data: "message"}`; the channel is unsubscribed then.
 *
 * Share one client: create it once (per process, per Redis) and call it from every
 * part of the program, concurrently; each call gets its own reply. A client per
 * call costs two connections and a round trip for ids each time.
 *
 * The connections are not part of the API (they are replaced after a lost
 * connection, and a command sent on them would race the client's own): Redis's
 * `CLIENT LIST` shows them, named `cerbas-node` and `cerbas-node-sub`.
 *
 * Faults. Every rejection is a CerbasError:
 *
 *     CerbasError                 base class
 *     ├─ CerbasTimeout            no reply within the call's timeout (its deadline holds
 *     │                           even when Redis is frozen or unreachable)
 *     ├─ CerbasConnectionError    the connection to Redis was lost, or Redis restarted,
 *     │   │                       while the call was in flight
 *     │   └─ CerbasClosedError    the client was closed (calls in flight and after)
 *     ├─ CerbasProtocolError      Redis refused the connection (a wrong password, no such
 *     │                           db) or a command (CERBAS-COUNTER is not a number), or
 *     │                           a reply is neither JSON nor msgpack
 *     └─ CerbasAbortError         the call's `signal` was aborted (its `name` is
 *                                 "AbortError", its `cause` the signal's reason)
 *
 * A reply `{status: "error"}` is the server's answer, not a fault: it resolves.
 *
 * When a connection breaks, calls not yet queued fail with CerbasConnectionError; calls
 * already queued keep waiting while the client reconnects. If Redis is the same
 * instance (INFO server `run_id`), their channels are subscribed again (the server
 * republishes a reply nobody heard for 5 s). If Redis restarted, or cannot be reached
 * again, they fail at once: after a restart the same id can name another process's
 * request, and a reply on that channel is not theirs. A new id block is reserved on
 * every new connection.
 *
 * Redis is found as the server finds it: the URL is the option, else
 * `CERBAS_REDIS_URL`, else `redis://127.0.0.1:6379` (a password goes in the URL:
 * `redis://:secret@host:6379`); the database is the one the URL names
 * (`redis://host:6379/3`, or `?db=3` for `unix://`), else 1 for env `dev` and 8 for
 * `prod` (env is the option, else `CERBAS_ENV`, else `dev`; any other env is an
 * error). Types: index.d.ts. Dependencies: `redis` (node-redis), `@msgpack/msgpack`.
 */

'use strict';

const { EventEmitter } = require('node:events');
const { createClient, ErrorReply } = require('redis');
const { decode } = require('@msgpack/msgpack');

const DEFAULT_URL = 'redis://127.0.0.1:6379';
const DEFAULT_ENV = 'dev';
const DEFAULT_PREFIX = 'CERBAS';
const DEFAULT_TIMEOUT_MS = 10000;
const ENV_DBS = { dev: 1, prod: 8 };
/** Ids reserved per `INCRBY` (docs/PROTOCOL.md: ids only need to be unique). */
const ID_BLOCK = 100;
// Pauses between attempts to connect while a call waits for Redis (ms).
const RETRY_FIRST_MS = 20;
const RETRY_MAX_MS = 500;

// --- errors -----------------------------------------------------------------------

/** The base class of every error the client rejects with. */
class CerbasError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** No reply arrived (or the request could not be queued) within its timeout. */
class CerbasTimeout extends CerbasError {}

/** The connection to Redis failed or was lost, or Redis restarted, during the call. */
class CerbasConnectionError extends CerbasError {}

/** The client was closed: calls in flight then, and every call after. */
class CerbasClosedError extends CerbasConnectionError {}

/** Redis refused the connection or a command, or a reply could not be decoded. */
class CerbasProtocolError extends CerbasError {}

/** The call's AbortSignal fired; `cause` is the signal's reason. */
class CerbasAbortError extends CerbasError {
  constructor(message, options) {
    super(message, options);
    this.name = 'AbortError'; // what code that handles aborts looks for
  }
}

/** `err` (from node-redis, or ours) as a CerbasError, `what` saying what failed. */
function wrapError(err, what) {
  if (err instanceof CerbasError) return err;
  if (err instanceof ErrorReply) {
    return new CerbasProtocolError(`${what}: Redis answered ${err.message}`, { cause: err });
  }
  return new CerbasConnectionError(`${what}: ${err?.message ?? err}`, { cause: err });
}

// --- finding Redis ------------------------------------------------------------------

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

// --- one pair of connections --------------------------------------------------------

/**
 * The two connections of one connected period, and the Redis instance they reached.
 * node-redis does not reconnect them (it would re-subscribe channels on its own,
 * across a Redis restart): when either breaks, the client drops both and opens a
 * new Session, and decides itself which channels to subscribe again.
 */
class Session {
  /**
   * A node-redis client never connected, whose duplicates are a Session's
   * connections. createClient builds a class of ~500 command methods (100+ ms of
   * CPU) unless its options are those of the process's previous createClient;
   * duplicate() reuses the class.
   */
  static template(url, db) {
    return createClient({
      // node-redis spells `redis+unix:` as `unix:`. RESP2 works with every Redis
      // version, as the server does.
      url: url.replace(/^redis\+unix:/, 'unix:'),
      database: db,
      RESP: 2,
      disableOfflineQueue: true, // a command never waits for a later connection
      // No per-command timeout: each call has its own deadline, and node-redis's
      // (an AbortSignal.timeout per command) costs CPU on every command.
      commandOptions: { timeout: 0 },
      socket: { reconnectStrategy: false },
    });
  }

  constructor(template, onLost) {
    // The names tell the connections apart in CLIENT LIST.
    this.cmd = template.duplicate({ name: 'cerbas-node' });
    this.sub = template.duplicate({ name: 'cerbas-node-sub' });
    this.runId = null;
    this.ready = false; // both connected, run_id known
    this.dead = false;
    this.lastError = null; // the first error of either connection
    const lost = (err) => {
      if (this.dead) return;
      this.lastError ??= err;
      if (this.ready) onLost(this, err);
    };
    this.cmd.on('error', lost);
    this.sub.on('error', lost);
  }

  /** Connects both and learns the instance's run_id; rejects (and cleans up) if not. */
  async open() {
    try {
      await Promise.all([this.cmd.connect(), this.sub.connect()]);
      const info = await this.cmd.info('server');
      const m = /^run_id:(\w+)/m.exec(info);
      if (!m) throw new CerbasProtocolError('INFO server names no run_id');
      this.runId = m[1];
      // Either connection may have broken after connecting: start again then.
      if (this.lastError) throw this.lastError;
      this.ready = true;
    } catch (err) {
      this.destroy();
      throw err;
    }
  }

  destroy() {
    this.dead = true;
    this.ready = false;
    for (const conn of [this.cmd, this.sub]) {
      try {
        conn.destroy();
      } catch {
        // already closed
      }
    }
  }
}

// --- one call ---------------------------------------------------------------------

/**
 * One request or send in flight: its deadline, abort listener and state. `finish`
 * settles it once; whatever finishes it first (reply, timeout, abort, close, a lost
 * connection) wins, and later steps see `done` and stop.
 */
class Call {
  constructor(client, func, timeoutMs, signal, resolveFn, rejectFn) {
    this.client = client;
    this.func = func;
    this.done = false;
    this.id = null;
    this.session = null; // the Session it uses; null while suspended
    this.pushed = false; // SET + RPUSH confirmed
    this.entry = null; // its channel entry, once watching
    this.msgpack = false;
    this.subscribes = false; // a request (waits for a reply), not a send
    this.lastError = null; // why connecting failed, for the timeout message
    this._resolve = resolveFn;
    this._reject = rejectFn;
    this.timer = setTimeout(() => {
      const why = this.id !== null
        ? `request ${this.id}`
        : `not connected to Redis${this.lastError ? `: ${this.lastError.message}` : ''}`;
      // `cause`: why it could not connect, if that is why.
      const options = this.id === null && this.lastError ? { cause: this.lastError } : undefined;
      this.finish(new CerbasTimeout(`no reply to ${func} (${why}) within ${timeoutMs} ms`, options));
    }, timeoutMs);
    this.signal = signal;
    if (signal) {
      this.onAbort = () => this.finish(new CerbasAbortError(`${func} aborted`, { cause: signal.reason }));
      signal.addEventListener('abort', this.onAbort, { once: true });
    }
    client._calls.add(this);
  }

  /** Settles the call: with `err`, else with `value`. Only the first time counts. */
  finish(err, value) {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.timer);
    if (this.signal) this.signal.removeEventListener('abort', this.onAbort);
    this.client._calls.delete(this);
    if (this.entry) this.client._unwatch(this.entry, this);
    if (err) this._reject(err);
    else this._resolve(value);
  }

  /** A message on its channel: the reply, decoded. */
  deliver(raw) {
    let reply;
    try {
      reply = this.msgpack ? decode(raw) : JSON.parse(raw);
    } catch (err) {
      this.finish(new CerbasProtocolError(`reply to ${this.func} (request ${this.id}) is not ${this.msgpack ? 'msgpack' : 'JSON'}: ${err.message}`, { cause: err }));
      return;
    }
    this.finish(null, reply);
  }
}

// --- the client -------------------------------------------------------------------

/**
 * A connection to one cerbas deployment: a Redis URL, a database, a prefix. Share
 * one between all callers (see the top of this file).
 *
 * `user` and `source` are sent with every request unless a call names others; they
 * must be registered in the server's configuration. `timeoutMs` is how long a
 * request waits for its reply unless a call names another.
 *
 * Emits `'error'` (a CerbasConnectionError) when a connection to Redis is lost, if
 * it has listeners; the calls it affects reject or reconnect as described above.
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
    checkTimeout(timeoutMs);
    this.prefix = prefix;
    this.user = user;
    this.source = source;
    this.timeoutMs = timeoutMs;
    this._template = null; // see Session.template
    this._session = null; // the connected Session
    this._opening = null; // {session, promise} while one connects
    this._runId = null; // of the Redis instance last connected to
    this._block = null; // {session, next, end}: ids reserved, next..end-1
    this._reserving = null; // {session, promise} of the INCRBY in flight
    this._calls = new Set(); // every Call in flight
    this._channels = new Map(); // channel -> entry {channel, msgpack, waiters, listener, session, subscribed, aheadId}
    this._ahead = null; // the entry subscribed ahead for the block's next id (see _subscribeAhead)
    this._closed = false;
  }

  /** True once close() was called. */
  get closed() {
    return this._closed;
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
   * `user`, `source`, `delay` (run no earlier than this many ms from now),
   * `timeoutMs` (default: the client's, plus `delay`), `signal` (an AbortSignal).
   * Rejects with a CerbasError (see the top of this file).
   */
  request(func, args, { msgpack = false, timeoutMs, signal, ...opts } = {}) {
    timeoutMs ??= this.timeoutMs + (Number.isSafeInteger(opts.delay) ? opts.delay : 0);
    return this._start(func, args, { timeoutMs, signal, ...opts }, (call, body) => {
      call.msgpack = Boolean(msgpack);
      call.subscribes = true;
      return this._request(call, body);
    });
  }

  /**
   * Queues a one-way call (nobody waits for its reply, and the server publishes
   * none: the body says `"reply": false`) and resolves to its id.
   * Options: `user`, `source`, `delay`, `timeoutMs` (for queueing it), `signal`.
   * On CerbasTimeout or CerbasConnectionError it may still have been queued.
   */
  send(func, args, { timeoutMs = this.timeoutMs, signal, ...opts } = {}) {
    return this._start(func, args, { timeoutMs, signal, ...opts, reply: false }, (call, body) =>
      this._send(call, body),
    );
  }

  /**
   * Closes both connections at once. Calls in flight reject with
   * CerbasClosedError, and so does every call made afterwards.
   */
  async close() {
    if (this._closed) return;
    this._closed = true;
    const err = new CerbasClosedError('client closed');
    for (const call of [...this._calls]) call.finish(err);
    this._channels.clear();
    this._ahead = null;
    if (this._session) this._session.destroy();
    if (this._opening) this._opening.session.destroy();
    this._session = this._opening = null;
  }

  // --- the steps of a call -----------------------------------------------------------

  // Checks the options, makes the Call and runs `run(call, body)` for it.
  _start(func, args, { timeoutMs, signal, ...opts }, run) {
    return new Promise((resolveFn, rejectFn) => {
      if (typeof func !== 'string' || func === '') {
        throw new TypeError(`func must be a non-empty string, not ${JSON.stringify(func)}`);
      }
      const { delay } = opts;
      if (delay !== undefined && delay !== null && !(Number.isSafeInteger(delay) && delay >= 0)) {
        throw new TypeError(`delay must be a whole number of ms, 0 or more, not ${delay}`);
      }
      checkTimeout(timeoutMs);
      if (this._closed) throw new CerbasClosedError('client closed');
      if (signal?.aborted) throw new CerbasAbortError(`${func} aborted`, { cause: signal.reason });
      const body = this.body(func, args, opts);
      const call = new Call(this, func, timeoutMs, signal, resolveFn, rejectFn);
      run(call, body).catch((err) => call.finish(wrapError(err, `${func} (request ${call.id ?? 'without id'})`)));
    });
  }

  async _request(call, body) {
    const session = await this._ready(call);
    if (!session) return;
    const id = await this._nextId(call, session);
    if (id === null) return;
    const channel = this.replyChannel(id, call.msgpack);
    const entry = this._watch(channel, call.msgpack, call, session);
    await entry.subscribed;
    // The call may have ended (timeout, abort, close, lost connection) meanwhile:
    // then it must not queue anything.
    if (call.done) return;
    await this._push(session, id, body);
    call.pushed = true;
  }

  async _send(call, body) {
    const session = await this._ready(call);
    if (!session) return;
    const id = await this._nextId(call, session);
    if (id === null) return;
    await this._push(session, id, body);
    call.finish(null, id);
  }

  // SET the body, then RPUSH the id: sent together, one round trip.
  _push(session, id, body) {
    return Promise.all([
      session.cmd.set(this.requestKey(id), body),
      session.cmd.rPush(this.queueKey(), String(id)),
    ]);
  }

  // The connected Session, connecting (again, with pauses) until there is one;
  // null once the call is done.
  async _ready(call) {
    for (let pause = RETRY_FIRST_MS; ; pause = Math.min(2 * pause, RETRY_MAX_MS)) {
      if (call.done) return null;
      if (this._session && !this._session.dead) {
        call.session = this._session;
        return this._session;
      }
      try {
        await this._connect();
        continue;
      } catch (err) {
        // Closed, or refused by Redis (a wrong password, no such db): trying again
        // would not help.
        if (err instanceof CerbasClosedError || err instanceof CerbasProtocolError) throw err;
        call.lastError = err;
      }
      if (call.done) return null;
      await new Promise((r) => setTimeout(r, pause));
    }
  }

  // The next id for `call` on `session`, reserving a block when none is left; null
  // once the call is done.
  async _nextId(call, session) {
    for (;;) {
      if (call.done) return null;
      if (session.dead) throw new CerbasConnectionError('lost the connection to Redis');
      const block = this._block;
      if (block && block.session === session && block.next < block.end) {
        call.id = block.next++;
        this._subscribeAhead(call, session, block);
        return call.id;
      }
      if (!this._reserving || this._reserving.session !== session) {
        const reserving = {
          session,
          promise: session.cmd.incrBy(this.counterKey(), ID_BLOCK).then(
            (top) => {
              if (this._reserving === reserving) this._reserving = null;
              if (!session.dead) this._block = { session, next: top - ID_BLOCK + 1, end: top + 1 };
            },
            (err) => {
              if (this._reserving === reserving) this._reserving = null;
              throw err;
            },
          ),
        };
        this._reserving = reserving;
      }
      await this._reserving.promise;
    }
  }

  // Adds `call` as a waiter on `channel`, subscribing on `session` if nobody waits
  // there yet. Each entry has its own listener, so that unsubscribing it never
  // drops another entry's (node-redis counts listeners per channel).
  _watch(channel, msgpack, call, session) {
    let entry = this._channels.get(channel);
    if (!entry) {
      entry = this._entry(channel, msgpack);
      this._subscribe(entry, session);
    }
    entry.waiters.add(call);
    call.entry = entry;
    return entry;
  }

  // A new entry for `channel`, in the map, not subscribed yet.
  _entry(channel, msgpack) {
    const entry = { channel, msgpack, waiters: new Set(), listener: null, session: null, subscribed: null, aheadId: null };
    entry.listener = (message) => {
      for (const waiter of [...entry.waiters]) waiter.deliver(message);
    };
    this._channels.set(channel, entry);
    return entry;
  }

  _subscribe(entry, session) {
    entry.session = session;
    entry.subscribed = session.sub.subscribe(entry.channel, entry.listener, entry.msgpack);
    entry.subscribed.catch(() => {}); // a lost connection is handled in _lost
  }

  // The JSON channel of the block's next id is subscribed as soon as an id is
  // taken by a JSON request, so that a sequential caller's next request finds its
  // channel confirmed and costs one round trip (SET + RPUSH) plus the server's
  // time. A call that takes that id without wanting it (msgpack, send) drops it.
  _subscribeAhead(call, session, block) {
    const ahead = this._ahead;
    if (ahead && ahead.aheadId === call.id) {
      this._ahead = null;
      ahead.aheadId = null;
      if (!call.subscribes || call.msgpack) this._release(ahead);
      // else _watch finds it by its channel
    }
    // Only JSON requests subscribe ahead: a program that sends one-way or asks for
    // msgpack would pay a SUBSCRIBE and an UNSUBSCRIBE for nothing.
    if (!call.subscribes || call.msgpack) return;
    if (this._ahead || block.next >= block.end || session !== this._session) return;
    const entry = this._entry(this.replyChannel(block.next, false), false);
    entry.aheadId = block.next;
    this._subscribe(entry, session);
    this._ahead = entry;
  }

  // `call` no longer waits on `entry`; the last one out unsubscribes (see _release).
  _unwatch(entry, call) {
    entry.waiters.delete(call);
    if (entry.waiters.size === 0) this._release(entry);
  }

  // Nobody waits on `entry`: unsubscribe, once the subscription is confirmed
  // (unsubscribing earlier would leave it behind).
  _release(entry) {
    if (this._channels.get(entry.channel) === entry) this._channels.delete(entry.channel);
    const { session } = entry;
    if (!session || session.dead) return;
    entry.subscribed
      .then(() => {
        if (!session.dead) return session.sub.unsubscribe(entry.channel, entry.listener, entry.msgpack);
      })
      .catch(() => {});
  }

  // Opens a Session (one at a time) and makes it the client's.
  _connect() {
    if (this._closed) return Promise.reject(new CerbasClosedError('client closed'));
    if (!this._opening) {
      this._template ??= Session.template(this.url, this.db);
      const session = new Session(this._template, (s, err) => this._lost(s, err));
      const opening = { session, promise: null };
      opening.promise = session.open().then(
        () => {
          if (this._opening === opening) this._opening = null;
          if (this._closed) {
            session.destroy();
            throw new CerbasClosedError('client closed');
          }
          // Lost between connecting and now: as if it had not connected.
          if (session.dead) throw wrapError(session.lastError ?? new Error('connection lost'), 'connecting to Redis');
          this._adopt(session);
        },
        (err) => {
          if (this._opening === opening) this._opening = null;
          throw wrapError(err, 'connecting to Redis');
        },
      );
      this._opening = opening;
    }
    return this._opening.promise;
  }

  // A new Session is connected: calls suspended by a lost connection wait on it if
  // Redis is the same instance, and fail if it restarted.
  _adopt(session) {
    const restarted = this._runId !== null && this._runId !== session.runId;
    this._runId = session.runId;
    this._session = session;
    this._block = null; // a new block per connection: the counter may have gone back
    const suspended = [...this._calls].filter((c) => c.session === null && c.pushed);
    if (restarted) {
      const err = new CerbasConnectionError('Redis restarted while the request was in flight (its reply is lost)');
      for (const call of suspended) call.finish(err);
      return;
    }
    for (const call of suspended) call.session = session;
    for (const entry of this._channels.values()) {
      if (!entry.session) this._subscribe(entry, session);
    }
  }

  // A connection of `session` broke: calls not yet queued fail; queued ones wait
  // for the next Session (see _adopt), which is opened at once.
  _lost(session, err) {
    session.destroy();
    if (this._session === session) this._session = null;
    if (this._closed) return;
    const lost = new CerbasConnectionError(`lost the connection to Redis: ${err?.message ?? err}`, { cause: err });
    if (this.listenerCount('error') > 0) this.emit('error', lost);
    this._ahead = null; // its id's block is given up with the connection
    for (const entry of [...this._channels.values()]) {
      if (entry.session !== session) continue;
      entry.session = entry.subscribed = null;
      if (entry.waiters.size === 0) this._channels.delete(entry.channel);
    }
    let suspended = 0;
    for (const call of [...this._calls]) {
      if (call.session !== session) continue;
      if (call.pushed) {
        call.session = null;
        suspended++;
      } else {
        call.finish(lost);
      }
    }
    if (suspended === 0) return;
    this._connect().catch((connectErr) => {
      const gone = new CerbasConnectionError(
        `lost the connection to Redis and cannot reconnect: ${connectErr.message}`,
        { cause: connectErr },
      );
      for (const call of [...this._calls]) if (call.session === null && call.pushed) call.finish(gone);
    });
  }
}

function checkTimeout(ms) {
  if (typeof ms !== 'number' || !(ms > 0) || ms > 2 ** 31 - 1) {
    throw new TypeError(`timeoutMs must be a number of ms above 0, not ${ms}`);
  }
}

function pad(id) {
  return String(id).padStart(10, '0');
}

module.exports = {
  Client,
  CerbasError,
  CerbasTimeout,
  CerbasConnectionError,
  CerbasClosedError,
  CerbasProtocolError,
  CerbasAbortError,
  resolve,
  urlDb,
  DEFAULT_URL,
  DEFAULT_ENV,
  DEFAULT_PREFIX,
  ID_BLOCK,
};
