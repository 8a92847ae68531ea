#!/usr/bin/env node
/**
 * What the original's test client (cerbastest.py) did, against a running server:
 * hello, hello as msgpack, slow (the server answers "timeout" after 5 s), then
 * halt the server after 1 s. As user "foo", source "cerbastest"; Redis and the
 * database come from CERBAS_REDIS_URL / CERBAS_ENV as for the server.
 *
 *     node example.js
 */

'use strict';

const { Client, CerbasTimeout } = require('./index');

async function main() {
  const c = new Client({ user: 'foo', source: 'cerbastest' });
  try {
    console.log(await c.request('hello'));
    console.log(await c.request('hello', null, { msgpack: true }));
    try {
      console.log(await c.request('slow')); // { status: 'error', data: 'timeout' }
    } catch (e) {
      if (!(e instanceof CerbasTimeout)) throw e;
      console.log('client timeout:', e.message);
    }
    console.log(await c.request('halt', { delay: 1000 }));
  } finally {
    await c.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
