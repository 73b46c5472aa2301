#!/usr/bin/env node
'use strict';
// Streams one reply with a live tokens/s line:  node chat.js --model DIR "your question"
const path = require('node:path');
const { WorkerClient } = require('./worker_client');

async function main() {
  const a = process.argv.slice(2); let model = process.env.MODEL; let maxTokens = 256; const words = [];
  for (let i = 0; i < a.length; i++) { if (a[i] === '--model') model = a[++i]; else if (a[i] === '--max-tokens') maxTokens = +a[++i]; else words.push(a[i]); }
  const root = path.join(__dirname, '..', '..');
  const w = new WorkerClient({ command: [process.env.MLX_WORKER_PYTHON || path.join(root, '.venv/bin/python'), '-m', 'worker'], cwd: root });
  await w.start();
  process.on('SIGINT', () => { if (w.current) w.cancel(w.current); });
  await w.load(model);
  const stream = w.generate({ messages: [{ role: 'user', content: words.join(' ') || 'Hello!' }] }, { max_tokens: maxTokens });
  w.current = stream.id;
  const t0 = Date.now(); let n = 0; let text = '';
  for await (const ev of stream) {
    if (ev.type === 'token') {
      n += ev.tokens.length; text += ev.text;
      const s = (Date.now() - t0) / 1000;
      process.stdout.write(ev.text);
      process.stderr.write(`\r\x1b[K${n} tokens, ${(n / Math.max(s, 1e-3)).toFixed(1)} tok/s`);
    } else if (ev.type === 'stats') process.stderr.write(`\r\x1b[K${ev.generated_tokens} tokens, ${(ev.generation_tps ?? 0).toFixed(1)} tok/s, ttft ${ev.ttft_s != null ? ev.ttft_s.toFixed(2) + ' s' : '-'}\n`);
    else if (ev.type === 'error') { console.error(`\nerror ${ev.code}: ${ev.message}`); process.exitCode = 1; }
    else if (ev.type === 'done') process.stdout.write(`\n[${ev.stop_reason}]\n`);
  }
  await w.close();
}
main().catch((e) => { console.error(e.message); process.exit(1); });
