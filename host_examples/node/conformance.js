#!/usr/bin/env node
'use strict';
// Node conformance runner for tests/support/conformance/*.jsonl (same format as tests/support/conformance/runner.py,
// see tests/support/conformance/README.md).  node conformance.js --worker "python -m worker" --model DIR FILES...
const { spawn } = require('node:child_process');
const readline = require('node:readline');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const TERMINAL = new Set(['done', 'error']);
const T = 60000;
class CaseFailure extends Error {}

class Proc {
  constructor(argv) {
    this.p = spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    this.queue = []; this.waiter = null; this.eof = false; this.stderr = []; this.lastSeq = 0;
    this.p.stdin.on('error', () => {});
    readline.createInterface({ input: this.p.stderr }).on('line', (l) => { this.stderr.push(l); if (this.stderr.length > 30) this.stderr.shift(); });
    const rl = readline.createInterface({ input: this.p.stdout, crlfDelay: Infinity });
    rl.on('line', (l) => { let ev; try { ev = JSON.parse(l); } catch { ev = { __bad: l }; } this.queue.push(ev); this._wake(); });
    rl.on('close', () => { this.eof = true; this._wake(); });
    this.exited = new Promise((r) => this.p.on('exit', (code) => r(code)));
  }
  _wake() { if (this.waiter) { const w = this.waiter; this.waiter = null; w(); } }
  async next(ms) {
    if (!this.queue.length && !this.eof) {
      await new Promise((r) => { const t = setTimeout(() => { this.waiter = null; r(); }, ms); this.waiter = () => { clearTimeout(t); r(); }; });
    }
    return this.queue.length ? this.queue.shift() : (this.eof ? null : undefined);
  }
  alive() { return this.p.exitCode === null && this.p.signalCode === null; }
  write(buf) { this.p.stdin.write(buf); }
  tail() { return 'worker stderr (tail):\n' + this.stderr.slice(-10).join('\n'); }
  async close() { if (this.alive()) { this.p.stdin.end(); const t = setTimeout(() => this.p.kill('SIGKILL'), 10000); await this.exited; clearTimeout(t); } }
  static async start(argv) {
    const w = new Proc(argv);
    const ev = await w.next(T);
    if (!ev || ev.type !== 'ready') throw new CaseFailure('first event is not ready: ' + JSON.stringify(ev) + '\n' + w.tail());
    w.ready = ev; w.lastSeq = ev.seq || 0;
    return w;
  }
}

const VAR = /\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g;
function subst(v, env) {
  if (typeof v === 'string') {
    const whole = /^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$/.exec(v);
    if (whole && whole[1] in env) return env[whole[1]];
    return v.replace(VAR, (_, k) => { if (!(k in env)) throw new CaseFailure('unknown placeholder ' + k); return String(env[k]); });
  }
  if (Array.isArray(v)) return v.map((x) => subst(x, env));
  if (v && typeof v === 'object') {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === '$repeat') { const [item, n] = subst(v.$repeat, env); return typeof item === 'string' ? item.repeat(n) : Array(n).fill(item); }
    if (keys.length === 1 && keys[0] === '$concat') return v.$concat.map((x) => subst(x, env)).join('');
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, subst(x, env)]));
  }
  return v;
}

const typeOk = (v, n) => ({ string: typeof v === 'string', integer: Number.isInteger(v), number: typeof v === 'number',
  boolean: typeof v === 'boolean', array: Array.isArray(v), object: v !== null && typeof v === 'object' && !Array.isArray(v), null: v === null })[n];
const J = (x) => (JSON.stringify(x) ?? 'undefined').slice(0, 200);
function isOps(e) { return e && typeof e === 'object' && !Array.isArray(e) && Object.keys(e).length && Object.keys(e).every((k) => k.startsWith('$')); }
function match(exp, act, p = '$') {
  if (act === undefined) act = null;
  if (isOps(exp)) {
    const errs = [];
    for (const [op, arg] of Object.entries(exp)) {
      let ok = true;
      const num = typeof act === 'number';
      switch (op) {
        case '$any': case '$absent': break;
        case '$type': ok = [].concat(arg).some((n) => typeOk(act, n)); break;
        case '$gte': ok = num && act >= arg; break;
        case '$gt': ok = num && act > arg; break;
        case '$lte': ok = num && act <= arg; break;
        case '$lt': ok = num && act < arg; break;
        case '$ne': ok = match(arg, act).length > 0; break;
        case '$in': ok = arg.some((x) => match(x, act).length === 0); break;
        case '$len': if (typeof act === 'string' || Array.isArray(act)) errs.push(...match(arg, act.length, p + '.length')); else ok = false; break;
        case '$contains': ok = (typeof act === 'string' || Array.isArray(act)) && act.includes(arg); break;
        case '$startswith': ok = typeof act === 'string' && act.startsWith(arg); break;
        case '$each': if (Array.isArray(act)) act.forEach((x, i) => errs.push(...match(arg, x, `${p}[${i}]`))); else ok = false; break;
        case '$not': ok = match(arg, act, p).length > 0; break;
        default: errs.push(`${p}: unknown matcher ${op}`);
      }
      if (!ok) errs.push(`${p}: ${op} ${J(arg)} failed on ${J(act)}`);
    }
    return errs;
  }
  if (exp && typeof exp === 'object' && !Array.isArray(exp)) {
    if (!act || typeof act !== 'object' || Array.isArray(act)) return [`${p}: expected an object, got ${J(act)}`];
    const errs = [];
    for (const [k, v] of Object.entries(exp)) {
      if (v && typeof v === 'object' && '$absent' in v) { if ((k in act) === Boolean(v.$absent)) errs.push(`${p}.${k}: expected ${v.$absent ? 'absent' : 'present'}`); continue; }
      errs.push(...match(v, act[k], `${p}.${k}`));
    }
    return errs;
  }
  if (Array.isArray(exp)) {
    if (!Array.isArray(act) || act.length !== exp.length) return [`${p}: expected ${J(exp)}, got ${J(act)}`];
    return exp.flatMap((x, i) => match(x, act[i], `${p}[${i}]`));
  }
  return exp === act ? [] : [`${p}: expected ${J(exp)}, got ${J(act)}`];
}
function orderRe(pat) {
  return new RegExp('^' + pat.split(/\s+/).map((t) => { const m = /^([a-z_|]+)([?*+]?)$/.exec(t); if (!m) throw new CaseFailure('bad order ' + t); return `(?:(?:${m[1]}) )${m[2]}`; }).join('') + '$');
}

class Case {
  constructor(spec, w, env) { Object.assign(this, { spec, w, env, events: [], sends: {}, types: {} }); }
  // an id's events, and the error refusing a line with that id while a request with it was in progress
  of(id) { return this.events.filter((e) => e.id === id || (id !== null && e.refused_id === id)); }
  terms(id) { return this.of(id).filter((e) => TERMINAL.has(e.type)); }
  async pull(ms) {
    const ev = await this.w.next(ms);
    if (!ev) return false;
    if (ev.__bad !== undefined) throw new CaseFailure('non-JSON line on stdout: ' + ev.__bad);
    const errs = match({ type: { $type: 'string' }, id: { $type: ['string', 'null'] }, seq: { $type: 'integer' } }, ev);
    if (!('id' in ev)) errs.push('$.id missing');
    if (ev.type === 'error') errs.push(...match({ code: { $type: 'string' }, number: { $type: 'integer' }, message: { $type: 'string' } }, ev));
    if (errs.length) throw new CaseFailure(`malformed event ${J(ev)}: ${errs}`);
    if (ev.seq !== this.w.lastSeq + 1) throw new CaseFailure(`seq jumped from ${this.w.lastSeq} to ${ev.seq}`);
    this.w.lastSeq = ev.seq; this.events.push(ev);
    return true;
  }
  async until(pred, ms, what) {
    const end = Date.now() + ms;
    while (!pred()) {
      const left = end - Date.now();
      if (left <= 0 || (!(await this.pull(left)) && (this.w.eof && !this.w.queue.length))) {
        if (pred()) return;
        if (left <= 0 || this.w.eof) throw new CaseFailure(`timed out / EOF waiting for ${what}\n${this.w.tail()}`);
      }
    }
  }
  reg(id, type) { if (typeof id === 'string') { this.sends[id] = (this.sends[id] || 0) + 1; if (!(id in this.types)) this.types[id] = type; } }
  async step(s) {
    const ms = (s.timeout || 60) * 1000;
    if ('send' in s) { const o = subst(s.send, this.env); this.reg(o.id, o.type); this.w.write(JSON.stringify(o) + '\n'); }
    else if ('raw' in s || 'raw_hex' in s) {
      const data = 'raw_hex' in s ? Buffer.from(s.raw_hex, 'hex') : Buffer.from(subst(s.raw, this.env));
      if (s.id) this.reg(s.id, s.request_type);
      this.w.write(Buffer.concat([data, Buffer.from(s.newline === false ? '' : '\n')]));
    } else if ('wait' in s) { const m = subst(s.wait, this.env); await this.until(() => this.events.some((e) => !match(m, e).length), ms, 'event ' + J(m)); }
    else if ('await' in s) { const ids = [].concat(s.await).map((i) => subst(i, this.env)); await this.until(() => ids.every((i) => this.terms(i).length >= (this.sends[i] || 1)), ms, 'terminals of ' + ids); }
    else if ('expect' in s) await this.expect(subst(s.expect, this.env));
    else if ('capture' in s) await this.capture(subst(s.capture, this.env));
    else if ('make_model' in s) this.makeModel(subst(s.make_model, this.env));
    else if ('expect_no_file' in s) { const p = subst(s.expect_no_file, this.env); if (fs.existsSync(p)) throw new CaseFailure(p + ' exists'); }
    else if ('expect_ready' in s) { const e = match(subst(s.expect_ready, this.env), this.w.ready, 'ready'); if (e.length) throw new CaseFailure(e.join('; ')); }
    else if ('close_stdin' in s) this.w.p.stdin.end();
    else if ('expect_exit' in s) {
      await this.until(() => this.w.eof && !this.w.queue.length, ms, 'stdout to close');
      const code = await Promise.race([this.w.exited, new Promise((r) => setTimeout(() => r('timeout'), ms).unref())]);
      if (code !== s.expect_exit) throw new CaseFailure(`exit status ${code}, expected ${s.expect_exit}`);
    } else if ('sleep' in s) await new Promise((r) => setTimeout(r, s.sleep * 1000));
    else throw new CaseFailure('unknown step ' + J(s));
  }
  async expect(sp) {
    const id = sp.id === undefined ? null : sp.id;
    if (id !== null && sp.await !== false) await this.until(() => this.terms(id).length >= (this.sends[id] || 1), (sp.timeout || 60) * 1000, 'terminal of ' + id);
    let evs = this.of(id);
    const types = evs.map((e) => e.type);
    if (id === null) evs = evs.filter((e) => e.type === 'error');
    const terms = evs.filter((e) => TERMINAL.has(e.type));
    const errs = [];
    if ('terminal' in sp) { if (terms.length !== 1) errs.push(`expected one terminal event, got ${terms.length}`); else errs.push(...match(sp.terminal, terms[0], 'terminal')); }
    if ('terminals' in sp) errs.push(...match(sp.terminals, terms, 'terminals'));
    if ('codes' in sp) { const c = terms.filter((e) => e.type === 'error').map((e) => e.code); if (J(c) !== J(sp.codes)) errs.push(`codes ${J(c)} != ${J(sp.codes)}`); }
    if ('order' in sp && !orderRe(sp.order).test(types.map((t) => t + ' ').join(''))) errs.push(`order ${types} !~ ${sp.order}`);
    for (const [t, m] of Object.entries(sp.each || {})) for (const e of evs.filter((x) => x.type === t)) errs.push(...match(m, e, `${t}#${e.seq}`));
    for (const [k, pick] of [['first', (a) => a[0]], ['last', (a) => a[a.length - 1]]]) {
      for (const [t, m] of Object.entries(sp[k] || {})) { const sel = evs.filter((x) => x.type === t); errs.push(...(sel.length ? match(m, pick(sel), `${k} ${t}`) : [`no ${t} event`])); }
    }
    for (const [t, m] of Object.entries(sp.count || {})) errs.push(...match(m, evs.filter((x) => x.type === t).length, `count(${t})`));
    if ('before' in sp) { const [a, b] = sp.before; const ta = this.terms(a), tb = this.terms(b); if (!ta.length || !tb.length || ta[0].seq > tb[0].seq) errs.push(`${a} not before ${b}`); }
    if ('tokens_total' in sp) errs.push(...match(sp.tokens_total, evs.filter((e) => e.type === 'token').reduce((n, e) => n + (e.tokens || []).length, 0), 'tokens_total'));
    if (errs.length) throw new CaseFailure(errs.join('; ') + '\nevents: ' + JSON.stringify(evs).slice(0, 1500));
  }
  async capture(sp) {
    await this.until(() => this.terms(sp.from).length, T, 'terminal of ' + sp.from);
    let v = sp.event ? this.of(sp.from).filter((e) => e.type === sp.event).pop() : this.terms(sp.from).pop();
    for (const part of (sp.field || 'text').split('.')) v = v == null ? v : v[part];
    if (sp.slice) v = [...v].slice(sp.slice[0], sp.slice[1]).join('');
    if ('until' in sp) { const i = v.indexOf(sp.until); if (i < 0) throw new CaseFailure(`${J(sp.until)} not in ${J(v)}`); v = v.slice(0, i); }
    if ((v === '' || v == null) && !sp.allow_empty) throw new CaseFailure('captured an empty value for ' + sp.var);
    this.env[sp.var] = v;
  }
  makeModel(sp) {
    const dst = path.join(this.env.TMP, sp.name);
    fs.cpSync(sp.from || this.env.MODEL, dst, { recursive: true });
    if (sp.patch_config) { const f = path.join(dst, 'config.json'); fs.writeFileSync(f, JSON.stringify({ ...JSON.parse(fs.readFileSync(f, 'utf8')), ...sp.patch_config })); }
    for (const [n, t] of Object.entries(sp.write || {})) fs.writeFileSync(path.join(dst, n), t);
    for (const n of sp.delete || []) fs.unlinkSync(path.join(dst, n));
    for (const n of sp.truncate || []) { const f = path.join(dst, n); const b = fs.readFileSync(f); fs.writeFileSync(f, b.subarray(0, Math.floor(b.length / 2))); }
    this.env[sp.var || sp.name.toUpperCase()] = dst;
  }
  async run() {
    for (const [i, s] of this.spec.steps.entries()) {
      try { await this.step(s); } catch (e) { if (e instanceof CaseFailure) e.message = `step ${i} ${J(s)}: ${e.message}`; throw e; }
    }
    const pending = () => Object.entries(this.sends).filter(([i, n]) => this.terms(i).length < n).map(([i]) => i);
    await this.until(() => !pending().length, T, 'terminals of ' + pending());
    while (this.w.queue.length) await this.pull(1);
    for (const [id, n] of Object.entries(this.sends)) {
      const evs = this.of(id); const terms = evs.filter((e) => TERMINAL.has(e.type));
      if (terms.length !== n) throw new CaseFailure(`${id}: ${n} sent, ${terms.length} terminal events`);
      if (n !== 1) continue;
      if (!TERMINAL.has(evs[evs.length - 1].type)) throw new CaseFailure(`${id}: events after the terminal event`);
      if (this.types[id] === 'generate') {
        const ty = evs.map((e) => e.type).join(' ');
        if (!/^(progress )*(token )*(stats )?(done|error)$/.test(ty)) throw new CaseFailure(`${id}: bad generate order ${ty}`);
        const d = evs[evs.length - 1];
        if (d.type === 'done') {
          const concat = evs.filter((e) => e.type === 'token').map((e) => e.text).join('');
          if ((d.text || '') !== concat) throw new CaseFailure(`${id}: done.text != token texts`);
          if (d.stop_reason == null) throw new CaseFailure(`${id}: done without stop_reason`);
        }
      }
    }
  }
}

function loadCases(files) {
  const out = [];
  for (const f of files) fs.readFileSync(f, 'utf8').split('\n').forEach((line, i) => {
    if (!line.trim() || line.trim().startsWith('//')) return;
    const c = JSON.parse(line); c.name = c.name || `${path.basename(f)}:${i + 1}`; c._file = `${f}:${i + 1}`; out.push(c);
  });
  return out;
}

async function runAll({ worker, model, files, filter, log = console.log }) {
  const argv = typeof worker === 'string' ? worker.split(/\s+/).filter(Boolean) : worker;
  const cases = loadCases(files).filter((c) => !filter || c.name.includes(filter));
  let shared = null; const failures = []; const t0 = Date.now();
  for (const c of cases) {
    const fresh = c.fresh || c.worker_args;
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-'));
    const t = Date.now(); let w = null;
    try {
      if (fresh) w = await Proc.start(argv.concat(c.worker_args || []));
      else { if (!shared || !shared.alive()) shared = await Proc.start(argv); w = shared; }
      await new Case(JSON.parse(JSON.stringify(c)), w, { MODEL: path.resolve(model), TMP: tmp }).run();
      if (!fresh && c.steps.some((s) => 'expect_exit' in s)) shared = null;
      log(`ok   ${c.name} (${((Date.now() - t) / 1000).toFixed(2)}s)`);
    } catch (e) {
      failures.push({ name: c.name, error: e });
      log(`FAIL ${c.name} [${c._file}]\n     ${e.message}`);
      if (w) await w.close(); if (w === shared) shared = null;
    } finally {
      if (fresh && w) await w.close();
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  }
  if (shared) await shared.close();
  log(`${cases.length - failures.length}/${cases.length} passed in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
  return { total: cases.length, failures };
}

module.exports = { runAll, loadCases, match, subst };

if (require.main === module) {
  const a = process.argv.slice(2); const files = []; let worker, model, filter;
  for (let i = 0; i < a.length; i++) {
    if (a[i] === '--worker') worker = a[++i]; else if (a[i] === '--model') model = a[++i]; else if (a[i] === '-k') filter = a[++i]; else files.push(a[i]);
  }
  if (!worker || !model || !files.length) { console.error('usage: conformance.js --worker CMD --model DIR FILES...'); process.exit(2); }
  runAll({ worker, model, files, filter }).then((r) => process.exit(r.failures.length ? 1 : 0));
}
