'use strict';
// Dependency-free Node client for the mlx-worker NDJSON protocol (see PROTOCOL.md).
// const { WorkerClient } = require('./worker_client');
// const w = new WorkerClient({ command: ['python', '-m', 'worker'] }); await w.start();
// for await (const ev of w.request({ type: 'generate', prompt: { text: 'hi' } })) { ... }
const { spawn } = require('node:child_process');
const readline = require('node:readline');
const { EventEmitter, once } = require('node:events');

const TERMINAL = new Set(['done', 'error']);

class WorkerError extends Error {
  constructor(message, extra = {}) { super(message); this.name = 'WorkerError'; Object.assign(this, extra); }
}

// An async iterator of one request's events, ending after its terminal event.
class EventStream {
  constructor(id) { this.id = id; this._buf = []; this._waiters = []; this._ended = false; this._error = null; }
  _push(ev) {
    if (this._ended) return;
    if (TERMINAL.has(ev.type)) this._ended = true;
    const w = this._waiters.shift();
    if (w) w.resolve({ value: ev, done: false }); else this._buf.push(ev);
    if (this._ended) this._flushEnd();
  }
  _fail(err) {
    if (this._ended) return;
    this._ended = true; this._error = err; this._flushEnd();
  }
  _flushEnd() {
    if (this._buf.length) return;
    for (const w of this._waiters.splice(0)) this._error ? w.reject(this._error) : w.resolve({ value: undefined, done: true });
  }
  next() {
    if (this._buf.length) {
      const value = this._buf.shift();
      return Promise.resolve({ value, done: false });
    }
    if (this._ended) return this._error ? Promise.reject(this._error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }
  [Symbol.asyncIterator]() { return this; }
  // Collect every event; resolves with the list (the last one is terminal).
  async all() { const out = []; for await (const ev of this) out.push(ev); return out; }
  async result() { const evs = await this.all(); return evs[evs.length - 1]; }
}

class WorkerClient extends EventEmitter {
  // opts: command (argv array), cwd, env, readyTimeoutMs (default 120000), restart (default true),
  //       stderrLines (tail kept, default 20), onLog(line)
  constructor(opts = {}) {
    super();
    this.opts = { command: ['python', '-m', 'worker'], readyTimeoutMs: 120000, restart: true, stderrLines: 20, ...opts };
    this.proc = null; this.ready = null; this.streams = new Map(); this.stderrTail = [];
    this._n = 0; this._closing = false; this._starting = null; this.restarts = 0;
    this._onExit = () => { if (this.proc) this.proc.kill('SIGKILL'); };
  }

  start() {
    if (this._starting) return this._starting;
    this._closing = false;
    const [cmd, ...args] = this.opts.command;
    const proc = spawn(cmd, args, { cwd: this.opts.cwd, env: this.opts.env || process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    this.proc = proc; this.ready = null; this.stderrTail = [];
    process.once('exit', this._onExit);
    readline.createInterface({ input: proc.stderr, crlfDelay: Infinity }).on('line', (line) => {
      this.stderrTail.push(line);
      if (this.stderrTail.length > this.opts.stderrLines) this.stderrTail.shift();
      this.emit('stderr', line);
    });
    proc.stdin.on('error', () => {}); // EPIPE after a crash is reported through 'exit'
    let resolveReady, rejectReady;
    const readyP = new Promise((res, rej) => { resolveReady = res; rejectReady = rej; });
    readline.createInterface({ input: proc.stdout, crlfDelay: Infinity }).on('line', (line) => {
      let ev;
      try { ev = JSON.parse(line); } catch { this.emit('protocol_error', line); return; }
      if (ev.type === 'ready' && !this.ready) { this.ready = ev; resolveReady(ev); return; }
      this.emit('event', ev);
      const s = ev.id != null ? this.streams.get(ev.id) : null;
      if (s) { s._push(ev); if (TERMINAL.has(ev.type)) this.streams.delete(ev.id); }
      else if (ev.type === 'error') this.emit('orphan_error', ev);
    });
    const timer = setTimeout(() => { rejectReady(this._crashError('no ready event within ' + this.opts.readyTimeoutMs + ' ms')); proc.kill('SIGKILL'); }, this.opts.readyTimeoutMs);
    proc.on('error', (e) => rejectReady(new WorkerError('could not start worker: ' + e.message)));
    proc.on('exit', (code, signal) => {
      clearTimeout(timer);
      process.removeListener('exit', this._onExit);
      // give the stderr reader a moment to deliver the last lines
      setImmediate(() => this._handleExit(proc, code, signal, rejectReady));
    });
    this._starting = readyP.then((r) => { clearTimeout(timer); return r; }, (e) => { this._starting = null; throw e; });
    return this._starting;
  }

  _crashError(what, extra = {}) {
    const tail = this.stderrTail.join('\n');
    return new WorkerError(`worker ${what}${tail ? '; stderr tail:\n' + tail : ''}`, { stderrTail: [...this.stderrTail], ...extra });
  }

  _handleExit(proc, code, signal, rejectReady) {
    if (proc !== this.proc) return;
    const expected = this._closing;
    const err = this._crashError(`exited (code ${code}, signal ${signal})`, { code, signal });
    rejectReady(err);
    for (const s of this.streams.values()) s._fail(err);
    this.streams.clear();
    this.proc = null; this._starting = null;
    this.emit('exit', { code, signal, expected, error: expected ? null : err });
    if (!expected && this.opts.restart) {
      this.restarts += 1;
      this.emit('restarting', err);
      this.start().then((r) => this.emit('restarted', r), (e) => this.emit('restart_failed', e));
    }
  }

  // Write one request; returns its EventStream. Awaits 'drain' when stdin's buffer is full.
  request(req) {
    const id = req.id || `r${++this._n}`;
    const full = { type: req.type, id, ...req, id }; // type and id first: a too-long line's error still names it
    const s = new EventStream(id);
    if (!this.proc || !this.ready) { s._fail(this._crashError('is not running')); return s; }
    if (this.streams.has(id)) { s._fail(new WorkerError(`request id ${id} is still in progress`)); return s; }
    this.streams.set(id, s);
    this._write(JSON.stringify(full) + '\n').catch((e) => s._fail(e));
    return s;
  }

  async _write(line) {
    const chain = (this._wq || Promise.resolve()).then(async () => {
      const proc = this.proc;
      if (!proc) throw this._crashError('is not running');
      if (!proc.stdin.write(line)) await Promise.race([once(proc.stdin, 'drain'), once(proc, 'exit')]);
    });
    this._wq = chain.catch(() => {});
    return chain;
  }

  generate(prompt, params = {}, extra = {}) { return this.request({ type: 'generate', prompt, params, ...extra }); }
  load(modelPath, options = {}) { return this.request({ type: 'load', model_path: modelPath, options }).result().then(check); }
  tokenize(text, addSpecial = true) { return this.request({ type: 'tokenize', text, add_special_tokens: addSpecial }).result().then(check); }
  status() { return this.request({ type: 'status' }).result().then(check); }
  unload() { return this.request({ type: 'unload' }).result().then(check); }
  cancel(target) { return this.request({ type: 'cancel', target }).result().then(check); }

  // Clean shutdown: `shutdown`, wait for exit; kill after timeoutMs.
  async close(timeoutMs = 5000) {
    const proc = this.proc;
    if (!proc) return;
    this._closing = true;
    const exited = once(proc, 'exit');
    try { this.request({ type: 'shutdown' }); proc.stdin.end(); } catch { /* already gone */ }
    const t = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
    await exited; clearTimeout(t);
  }
}

function check(ev) {
  if (ev.type === 'error') throw new WorkerError(`${ev.code}: ${ev.message}`, { event: ev, code: ev.code });
  return ev;
}

module.exports = { WorkerClient, WorkerError, EventStream, check };
