'use strict';
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { WorkerClient } = require('../worker_client');
const { Bridge } = require('../../electron/bridge');
const gen = require('../gen_types');

const ROOT = path.join(__dirname, '..', '..', '..');
const PY = process.env.MLX_WORKER_PYTHON || path.join(ROOT, '.venv', 'bin', 'python');
let MODEL = process.env.MODEL_FIXTURE;
if (!MODEL) {
  MODEL = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'nodefix-')), 'llama');
  execFileSync(PY, ['-m', 'tests.support.fixtures', 'llama', MODEL], { cwd: ROOT });
}
const LONG = { max_tokens: 100000 };
const mk = (o = {}) => new WorkerClient({ command: [PY, '-m', 'worker'], cwd: ROOT, ...o });

test('index.d.ts is fresh', () => {
  assert.strictEqual(fs.readFileSync(gen.OUT, 'utf8'), gen.generate(), 'run node host_examples/node/gen_types.js');
});

test('client: stream, cancel, crash, restart, bridge', async (t) => {
  const w = mk();
  const ready = await w.start();
  assert.strictEqual(ready.type, 'ready');
  t.after(() => w.close());
  const info = await w.load(MODEL);
  assert.strictEqual(info.model.model_type, 'llama');

  await t.test('streams a generation', async () => {
    const evs = await w.generate({ text: 'hello' }, { max_tokens: 8 }).all();
    const toks = evs.filter((e) => e.type === 'token');
    const done = evs[evs.length - 1];
    assert.strictEqual(done.stop_reason, 'max_tokens');
    assert.strictEqual(toks.map((e) => e.text).join(''), done.text);
    assert.strictEqual(toks.reduce((n, e) => n + e.tokens.length, 0), 8);
  });

  await t.test('cancel', async () => {
    const s = w.generate({ text: 'x' }, LONG);
    let ack;
    for await (const ev of s) {
      if (ev.type === 'token' && !ack) ack = await w.cancel(s.id);
      if (ev.type === 'done') assert.strictEqual(ev.stop_reason, 'cancelled');
    }
    assert.strictEqual(ack.cancelled, true);
  });

  await t.test('SIGKILL gives an error with the stderr tail, then restart works', async () => {
    const restarted = new Promise((r) => w.once('restarted', r));
    const s = w.generate({ text: 'x' }, LONG);
    await s.next();
    w.proc.kill('SIGKILL');
    await assert.rejects(s.all(), (e) => /SIGKILL/.test(e.message) && /stderr tail/.test(e.message) && e.stderrTail.length > 0);
    await restarted;
    assert.strictEqual(w.restarts, 1);
    await w.load(MODEL);
    const done = await w.generate({ text: 'hello' }, { max_tokens: 3 }).result();
    assert.strictEqual(done.stop_reason, 'max_tokens');
  });

  await t.test('electron bridge forwards events and cancels', async () => {
    const sent = [];
    let finish;
    const finished = new Promise((r) => { finish = r; });
    const sink = { send: (ch, ev) => { sent.push([ch, ev]); if (ev.type === 'done' || ev.type === 'error') finish(ev); } };
    const handlers = {};
    new Bridge(w, sink).register({ handle: (ch, fn) => { handlers[ch] = fn; } });
    const id = await handlers['worker:generate'](null, { prompt: { text: 'x' }, params: LONG });
    while (!sent.some(([, e]) => e.type === 'token')) await new Promise((r) => setTimeout(r, 5));
    const ack = await handlers['worker:cancel'](null, { id });
    assert.strictEqual(ack.cancelled, true);
    const done = await finished;
    assert.strictEqual(done.stop_reason, 'cancelled');
    assert.ok(sent.every(([ch, e]) => ch === 'worker:event' && e.id === id));
  });
});
