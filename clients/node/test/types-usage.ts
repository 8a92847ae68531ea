// Type-checked by types.test.js when `tsc` is installed: how a TypeScript program
// uses the client. Not run.

import {
  Client, CerbasError, CerbasTimeout, CerbasAbortError, CerbasConnectionError, Reply, ID_BLOCK,
} from '..';

async function main(): Promise<void> {
  const c = new Client({ user: 'foo', source: 'web', timeoutMs: 2000 });
  const controller = new AbortController();
  const reply: Reply<number> = await c.request<number>('sum', { a: 1, b: 2 }, {
    msgpack: true, delay: 10, signal: controller.signal,
  });
  if (reply.status === 'ok') {
    const n: number = reply.data;
    console.log(n + ID_BLOCK);
  } else {
    const message: string = reply.data;
    console.log(message);
  }
  const id: number = await c.send('tally', { name: 'x' }, { timeoutMs: 500 });
  c.on('error', (err: CerbasConnectionError) => console.error(err.message, id));
  try {
    await c.request('slow');
  } catch (e) {
    if (e instanceof CerbasTimeout || e instanceof CerbasAbortError) console.log(e.name);
    else if (!(e instanceof CerbasError)) throw e;
  }
  await c.close();
}

main();
