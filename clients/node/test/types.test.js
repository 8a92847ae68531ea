// The TypeScript declarations (index.d.ts) against index.js: the same names, the
// same error hierarchy, and a program using them type-checks with tsc
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

// The error classes index.d.ts declares (those that extend Error, directly or
// not), each with the class it extends.
function declaredErrors(dts) {
  const parents = Object.fromEntries(
    [...dts.matchAll(/^export class (\w+) extends (\w+)/gm)].map((m) => [m[1], m[2]]),
  );
  const errors = {};
  for (let grew = true; grew;) {
    grew = false;
    for (const [name, parent] of Object.entries(parents)) {
      if (!(name in errors) && (parent === 'Error' || parent in errors)) {
        errors[name] = parent;
        grew = true;
      }
    }
  }
  return errors;
}

test('index.d.ts declares the error hierarchy of index.js', () => {
  const exported = require('..');
  const errors = Object.entries(exported).filter(([, v]) => typeof v === 'function' && v.prototype instanceof Error);
  const actual = Object.fromEntries(errors.map(([name, cls]) => [name, Object.getPrototypeOf(cls).name]));
  assert.equal(actual.CerbasError, 'Error');
  for (const name of ['CerbasTimeout', 'CerbasConnectionError', 'CerbasProtocolError', 'CerbasAbortError']) {
    assert.equal(actual[name], 'CerbasError', `${name} extends ${actual[name]}`);
  }
  assert.equal(actual.CerbasClosedError, 'CerbasConnectionError');
  const dts = fs.readFileSync(path.join(ROOT, 'index.d.ts'), 'utf8');
  assert.deepEqual(declaredErrors(dts), actual);
});

// tsc: $TSC, else node_modules/.bin/tsc (a devDependency: `npm ci` installs it, as
// scripts/setup.sh does for `make test`), else on the PATH. Skipped only where none
// is installed (`npm ci --omit=dev`).
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
