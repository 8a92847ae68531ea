// The TypeScript declarations (index.d.ts) against index.js: the same names, and,
// when `tsc` and @types/node are installed, a program using them type-checks
// (test/types-usage.ts). Not for behaviour: the other test files.

'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');

test('package.json points at index.d.ts, which declares what index.js exports', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  assert.equal(pkg.types, 'index.d.ts');
  const dts = fs.readFileSync(path.join(ROOT, 'index.d.ts'), 'utf8');
  const declared = [...dts.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, Object.keys(require('..')).sort());
});

// tsc: $TSC, else node_modules/.bin/tsc, else on the PATH. Not a dependency of the
// package: `npm install --prefix /tmp/ts typescript @types/node` and
// TSC=/tmp/ts/node_modules/.bin/tsc run this test.
function findTsc() {
  if (process.env.TSC) return process.env.TSC;
  const local = path.join(ROOT, 'node_modules', '.bin', 'tsc');
  if (fs.existsSync(local)) return local;
  const found = spawnSync('sh', ['-c', 'command -v tsc'], { encoding: 'utf8' });
  return found.status === 0 ? found.stdout.trim() : null;
}

// The @types folder holding @types/node: beside tsc's package, else ours.
function typeRoots(tsc) {
  const beside = path.resolve(fs.realpathSync(tsc), '..', '..', '..', '@types');
  for (const dir of [beside, path.join(ROOT, 'node_modules', '@types')]) {
    if (fs.existsSync(path.join(dir, 'node', 'package.json'))) return dir;
  }
  return null;
}

const tsc = findTsc();
const roots = tsc && typeRoots(tsc);
const skip = !tsc ? 'tsc is not installed' : !roots ? '@types/node is not installed' : false;

test('a TypeScript program using the client type-checks', { skip }, () => {
  const out = spawnSync(tsc, [
    '--noEmit', '--strict', '--target', 'es2022', '--module', 'commonjs',
    '--types', 'node', '--typeRoots', roots, path.join(__dirname, 'types-usage.ts'),
  ], { cwd: ROOT, encoding: 'utf8' });
  assert.equal(out.status, 0, out.stdout + out.stderr);
});
