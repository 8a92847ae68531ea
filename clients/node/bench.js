#!/usr/bin/env node
/**
 * The Node client's benchmark, per the contract in BENCH.md: W1 (one caller,
 * sequential round trips, next to node-redis's own PING) or W2 (concurrent callers
 * sharing ONE client for some seconds). Prints one JSON line on stdout; logs go to
 * stderr. Not for: starting Redis or a server (`make bench` does), nor asserting.
 *
 *     node clients/node/bench.js --redis redis://127.0.0.1:6379 --workload w1 [--count 2000]
 *     node clients/node/bench.js --redis URL --workload w2 [--callers 16] [--seconds 5]
 *     (also --func echo; a failed call counts in "errors" and the run goes on)
 */

'use strict';

const { createClient } = require('redis');
const { Client } = require('./index');

const WARMUP = 200;

function parseArgs(argv) {
  const opts = { redis: undefined, workload: 'w1', callers: 16, seconds: 5, count: 2000, func: 'echo' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    const value = argv[i + 1];
    if (!(key in opts) || value === undefined) throw new Error(`unknown or incomplete argument: ${argv[i]}`);
    opts[key] = ['callers', 'seconds', 'count'].includes(key) ? Number(value) : value;
  }
  if (!['w1', 'w2'].includes(opts.workload)) throw new Error(`--workload must be w1 or w2, not ${opts.workload}`);
  for (const k of ['callers', 'seconds', 'count']) {
    if (!(opts[k] > 0)) throw new Error(`--${k} must be a number above 0`);
  }
  return opts;
}

/** The q-quantile (0..1) of `sorted` (ns), in ms. */
function quantileMs(sorted, q) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1);
  return Math.round(sorted[Math.max(0, i)] / 1e3) / 1e3;
}

const now = () => Number(process.hrtime.bigint()); // ns
const cpuUs = () => {
  const { user, system } = process.cpuUsage();
  return user + system;
};

async function pingP50(url, count) {
  const r = createClient({ url, RESP: 2 });
  await r.connect();
  try {
    const times = [];
    for (let i = 0; i < count; i++) {
      const t = now();
      await r.ping();
      times.push(now() - t);
    }
    return quantileMs(times.sort((a, b) => a - b), 0.5);
  } finally {
    await r.close();
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const client = new Client({ url: opts.redis });
  const args = { message: 'hi' };
  const times = [];
  let errors = 0;
  const call = async () => {
    const t = now();
    try {
      const reply = await client.request(opts.func, args);
      if (reply.status !== 'ok') throw new Error(`error reply: ${reply.data}`);
      times.push(now() - t);
    } catch (err) {
      errors++;
      if (errors <= 5) console.error(`bench: ${err.message}`);
    }
  };
  let pingMs = null;
  let callers = 1;
  let started;
  let cpuStart;
  try {
    if (opts.workload === 'w1') {
      pingMs = await pingP50(client.url, opts.count);
      for (let i = 0; i < WARMUP; i++) await call();
      times.length = 0;
      errors = 0;
      cpuStart = cpuUs();
      started = now();
      for (let i = 0; i < opts.count; i++) await call();
    } else {
      callers = opts.callers;
      await Promise.all(Array.from({ length: callers }, async () => {
        for (let i = 0; i < WARMUP / 10; i++) await call();
      }));
      times.length = 0;
      errors = 0;
      cpuStart = cpuUs();
      started = now();
      const until = started + opts.seconds * 1e9;
      await Promise.all(Array.from({ length: callers }, async () => {
        while (now() < until) await call();
      }));
    }
  } finally {
    await client.close();
  }
  const elapsed = (now() - started) / 1e9;
  const cpu = cpuUs() - cpuStart;
  const requests = times.length;
  times.sort((a, b) => a - b);
  const round = (x, digits) => (x === null ? null : Number(x.toFixed(digits)));
  console.log(JSON.stringify({
    client: 'node',
    workload: opts.workload,
    callers,
    requests,
    seconds: round(elapsed, 2),
    rps: round(requests / elapsed, 1),
    p50_ms: quantileMs(times, 0.5),
    p99_ms: quantileMs(times, 0.99),
    ping_p50_ms: pingMs,
    client_cpu_us_per_rt: requests ? round(cpu / requests, 1) : null,
    errors,
  }));
}

main().catch((err) => {
  console.error(`bench: ${err.stack || err}`);
  process.exitCode = 1;
});
