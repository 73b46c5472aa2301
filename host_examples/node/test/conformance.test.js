'use strict';
// The Node conformance runner over a few case files (the Python suite runs all of them).
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { runAll } = require('../conformance');

const ROOT = path.join(__dirname, '..', '..', '..');
const PY = process.env.MLX_WORKER_PYTHON || path.join(ROOT, '.venv', 'bin', 'python');

test('conformance cases pass through the node runner', async () => {
  const model = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'nodeconf-')), 'llama');
  execFileSync(PY, ['-m', 'tests.support.fixtures', 'llama', model], { cwd: ROOT });
  const dir = path.join(ROOT, 'tests', 'support', 'conformance');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.jsonl')).sort().map((f) => path.join(dir, f));
  const lines = [];
  const r = await runAll({ worker: [PY, '-m', 'worker'], model, files, log: (l) => lines.push(l) });
  assert.ok(r.total >= 40);
  assert.deepStrictEqual(r.failures.map((f) => f.name), [], lines.join('\n'));
});
