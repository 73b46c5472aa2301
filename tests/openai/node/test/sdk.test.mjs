// The unmodified npm SDKs (openai; ai + @ai-sdk/openai-compatible, pinned in package-lock.json) against
// mlx-worker-serve on the tiny Hermes-style tool fixture driven to think (tests/openai/serving.py, thinker_dir):
// a streamed and a whole chat equal to mlx-lm's greedy answer, a tool call, reasoning kept out of the text, and an
// abort mid-stream after which the worker runs nothing and the next answer is right.
// Run: `npm ci --no-audit --no-fund` here, then `node --test tests/openai/node/test/` (make test does both).
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { generateText, jsonSchema, streamText, tool } from 'ai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..');
const PY = process.env.MLX_WORKER_PYTHON || path.join(ROOT, '.venv', 'bin', 'python');
const KEY = 'sk-node-test';
const HELLO = [{ role: 'user', content: 'Hello there!' }];
const WEATHER_PARAMS = {
  type: 'object', properties: { city: { type: 'string', enum: ['Paris', 'London'] } },
  required: ['city'], additionalProperties: false,
};
const WEATHER = { type: 'function', function: { name: 'get_weather', description: 'the weather in a city', parameters: WEATHER_PARAMS } };

let server, base, model, name, expected, log;

const py = (...args) => execFileSync(PY, ['-m', 'tests.openai.serving', ...args], { cwd: ROOT, encoding: 'utf8' }).trim();

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

async function health() {
  const r = await fetch(`${base}/health`);
  return { status: r.status, body: await r.json() };
}

async function waitIdle(ms) {
  const t0 = Date.now();
  for (;;) {
    const h = await health().catch(() => null);
    if (h && h.status === 200 && h.body.running.length === 0 && h.body.queue.length === 0) return Date.now() - t0;
    assert.ok(Date.now() - t0 < ms, `the worker still runs after ${ms} ms: ${JSON.stringify(h && h.body)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

before(async () => {
  model = py('thinker', fs.mkdtempSync(path.join(os.tmpdir(), 'openai-node-')));
  name = path.basename(model);
  expected = JSON.parse(py('greedy', model, '10', JSON.stringify(HELLO)));
  assert.ok(expected.length > 0 && !expected.includes('think>'));
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  log = [];
  server = spawn(PY, ['-m', 'openai_server', '--model', model, '--port', String(port), '--api-key', KEY, '--log-level', 'warning'],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  for (const s of [server.stdout, server.stderr]) s.on('data', (d) => log.push(String(d)));
  const t0 = Date.now();
  for (;;) {
    const h = await health().catch(() => null);
    if (h && h.status === 200) break;
    assert.ok(server.exitCode === null && Date.now() - t0 < 120000, `the server did not come up:\n${log.join('')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise((r) => server.once('exit', r));
    server.kill('SIGTERM');
    await exited;
  }
});

const openai = () => new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0 });
const provider = () => createOpenAICompatible({ name: 'mlx', baseURL: `${base}/v1`, apiKey: KEY, includeUsage: true });

test('openai: a whole and a streamed chat are mlx-lm greedy output', async () => {
  const client = openai();
  const r = await client.chat.completions.create({ model: name, messages: HELLO, max_tokens: 10 });
  assert.equal(r.choices[0].message.content, expected);
  assert.equal(r.usage.completion_tokens, 10);
  const stream = await client.chat.completions.create({
    model: name, messages: HELLO, max_tokens: 10, stream: true, stream_options: { include_usage: true },
  });
  let text = '', usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content || '';
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, expected);
  assert.equal(usage.prompt_tokens, r.usage.prompt_tokens);
  assert.ok(usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1);
});

test('openai: a required tool call, whole and as streamed deltas', async () => {
  const client = openai();
  const ask = [{ role: 'user', content: 'What is the weather in Paris?' }];
  const r = await client.chat.completions.create({ model: name, messages: ask, tools: [WEATHER], tool_choice: 'required', max_tokens: 100 });
  const call = r.choices[0].message.tool_calls[0];
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  assert.equal(call.function.name, 'get_weather');
  assert.ok(['Paris', 'London'].includes(JSON.parse(call.function.arguments).city));
  const stream = await client.chat.completions.create({ model: name, messages: ask, tools: [WEATHER], tool_choice: 'required', max_tokens: 100, stream: true });
  let args = '', id = null, finish = null;
  for await (const chunk of stream) {
    for (const d of chunk.choices[0].delta.tool_calls || []) { id = id || d.id; args += d.function.arguments || ''; }
    finish = chunk.choices[0].finish_reason || finish;
  }
  assert.ok(id && finish === 'tool_calls');
  assert.deepEqual(JSON.parse(args), JSON.parse(call.function.arguments));
});

test('openai: an abort mid-stream cancels the generate; the next answer is right', async () => {
  const client = openai();
  const ac = new AbortController();
  const stream = await client.chat.completions.create({ model: name, messages: HELLO, max_tokens: 100000, stream: true }, { signal: ac.signal });
  let n = 0;
  try {
    for await (const chunk of stream) {
      if (chunk.choices[0].delta.content && ++n === 3) ac.abort();
    }
  } catch (e) {
    assert.match(String(e && e.name), /Abort/);  // or the iteration just ends: the SDK's choice
  }
  assert.equal(n, 3);
  assert.ok(await waitIdle(2000) < 2000);
  const r = await client.chat.completions.create({ model: name, messages: HELLO, max_tokens: 10 });
  assert.equal(r.choices[0].message.content, expected);
});

test('ai sdk: generateText and streamText are mlx-lm greedy output', async () => {
  const m = provider()(name);
  const whole = await generateText({ model: m, messages: HELLO, maxOutputTokens: 10 });
  assert.equal(whole.text, expected);
  assert.equal(whole.usage.outputTokens, 10);
  const s = streamText({ model: m, messages: HELLO, maxOutputTokens: 10 });
  let text = '';
  for await (const part of s.textStream) text += part;
  assert.equal(text, expected);
  assert.equal((await s.usage).outputTokens, 10);
});

test('ai sdk: a required tool call', async () => {
  const r = await generateText({
    model: provider()(name), prompt: 'What is the weather in Paris?', maxOutputTokens: 100, toolChoice: 'required',
    tools: { get_weather: tool({ description: 'the weather in a city', inputSchema: jsonSchema(WEATHER_PARAMS) }) },
  });
  assert.equal(r.toolCalls.length, 1);
  assert.equal(r.toolCalls[0].toolName, 'get_weather');
  assert.ok(['Paris', 'London'].includes(r.toolCalls[0].input.city));
  assert.equal(r.finishReason, 'tool-calls');
});

test('ai sdk: reasoning is reasoningText, never in the text', async () => {
  const r = await generateText({
    model: provider()(name), prompt: 'What is the weather in Paris?', maxOutputTokens: 12,
    providerOptions: { mlx: { chat_template_kwargs: { think_open: true } } },
  });
  assert.ok(r.reasoningText && r.reasoningText.trim().length > 0);
  assert.ok(!r.text.includes(r.reasoningText.trim()) && !r.text.includes('think>'));
});

test('ai sdk: an abort mid-stream cancels the generate', async () => {
  const ac = new AbortController();
  const s = streamText({ model: provider()(name), messages: HELLO, maxOutputTokens: 100000, abortSignal: ac.signal });
  let n = 0;
  try {
    for await (const part of s.textStream) if (part && ++n === 3) ac.abort();
  } catch (e) {
    assert.match(String(e && e.name), /Abort/);
  }
  assert.equal(n, 3);
  assert.ok(await waitIdle(2000) < 2000);
  const whole = await generateText({ model: provider()(name), messages: HELLO, maxOutputTokens: 10 });
  assert.equal(whole.text, expected);
});
