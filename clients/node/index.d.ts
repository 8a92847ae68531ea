// TypeScript declarations of the cerbas Node.js client (index.js; its comment says
// how it works and how to share one client). Not for: the wire protocol, which is
// docs/PROTOCOL.md.

import { EventEmitter } from 'node:events';

/** The reply of the server: a result, or the server's error message. */
export type Reply<T = unknown> =
  | { status: 'ok'; data: T }
  | { status: 'error'; data: string };

export interface ClientOptions {
  /** Redis URL; default `CERBAS_REDIS_URL`, else `redis://127.0.0.1:6379`. */
  url?: string;
  /** `dev` (db 1) or `prod` (db 8) when the URL names no db; default `CERBAS_ENV`, else `dev`. */
  env?: 'dev' | 'prod';
  /** Key prefix; default `CERBAS`. */
  prefix?: string;
  /** Sent with every request unless a call names another; default `test`. */
  user?: string;
  /** Sent with every request unless a call names another; default `test`. */
  source?: string;
  /** How long a request waits for its reply (ms); default 10000. */
  timeoutMs?: number;
}

export interface CallOptions {
  /** Another user than the client's. */
  user?: string;
  /** Another source than the client's. */
  source?: string;
  /** Run no earlier than this many ms after the server reads the request (a whole number ≥ 0). */
  delay?: number;
  /** Deadline of the call (ms). For request(): default the client's `timeoutMs` plus `delay`. */
  timeoutMs?: number;
  /** Aborting it rejects the call at once with CerbasAbortError (the request may still run). */
  signal?: AbortSignal;
}

export interface RequestOptions extends CallOptions {
  /** Ask for the reply in msgpack (decoded before it is returned). */
  msgpack?: boolean;
}

/** The base class of every error the client rejects with. */
export class CerbasError extends Error {}
/** No reply arrived (or the request could not be queued) within the call's timeout; `cause`: why it could not connect, if so. */
export class CerbasTimeout extends CerbasError {}
/** The connection to Redis failed or was lost, or Redis restarted, during the call. */
export class CerbasConnectionError extends CerbasError {}
/** The client was closed: calls in flight then, and every call after. */
export class CerbasClosedError extends CerbasConnectionError {}
/** Redis refused the connection (password, db) or a command, or a reply could not be decoded. */
export class CerbasProtocolError extends CerbasError {}
/** The call's signal was aborted; `name` is `"AbortError"`, `cause` the signal's reason. */
export class CerbasAbortError extends CerbasError {}

/**
 * A connection to one cerbas deployment. Make one per process and share it between
 * all callers: calls run concurrently over its two connections. These are not part
 * of the API; Redis's `CLIENT LIST` shows them as `cerbas-node` and `cerbas-node-sub`.
 * Emits `'error'` (a CerbasConnectionError) when a connection to Redis is lost.
 */
export class Client extends EventEmitter {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly env: 'dev' | 'prod';
  readonly db: number;
  prefix: string;
  user: string;
  source: string;
  timeoutMs: number;
  /** True once close() was called. */
  readonly closed: boolean;

  /** Calls `func` with `args` and resolves to its reply. */
  request<T = unknown>(func: string, args?: object | null, options?: RequestOptions): Promise<Reply<T>>;
  /** Queues a one-way call (no reply is published) and resolves to its id. */
  send(func: string, args?: object | null, options?: CallOptions): Promise<number>;
  /** Closes both connections; calls in flight and later calls reject with CerbasClosedError. */
  close(): Promise<void>;

  counterKey(): string;
  queueKey(): string;
  requestKey(id: number): string;
  replyChannel(id: number, msgpack?: boolean): string;
  /** The JSON request body. */
  body(
    func: string,
    args?: object | null,
    options?: { user?: string; source?: string; delay?: number; reply?: boolean },
  ): string;

  on(event: 'error', listener: (err: CerbasConnectionError) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

/** Redis URL, env and db as the server chooses them. */
export function resolve(url?: string, env?: string): { url: string; env: 'dev' | 'prod'; db: number };
/** The db a Redis URL names, or null. */
export function urlDb(url: string): number | null;

export const DEFAULT_URL: string;
export const DEFAULT_ENV: string;
export const DEFAULT_PREFIX: string;
/** Ids reserved per INCRBY of the counter. */
export const ID_BLOCK: number;
