// Validates the Kubernetes manifests under deploy/ without a cluster (called by scripts/lint-deploy).
//
//   node scripts/k8s-validate.mjs <node_modules dir> <repo root>
//
// kubectl and kustomize are not installable on every machine this runs on, so the script renders
// each kustomization itself (the subset of kustomize the repo uses: resources, components, JSON 6902
// patches with targets; anything else is rejected rather than silently ignored). When a working
// `kubectl kustomize` is on PATH it renders too, and both renderings must be identical, which keeps
// the in-house renderer honest.
//
// Each rendered object is then checked by
//   1. the kubernetes-models schema validator (types, enums, required fields);
//   2. a strict field check built from kubernetes-models' TypeScript declarations: the schemas allow
//      unknown fields, so without it a misspelt `readinesProbe` would pass and be dropped by the API
//      server;
//   3. a structural check for ServiceMonitor (no model for CRDs);
//   4. cross-object checks: selectors, port names, probe ports, mounts, HPA target, the
//      drain / grace-period arithmetic, the preload ConfigMap's profile specs, and the server flags
//      used by the image and the manifests against those server/main.cc defines.
// Exit status 1 on any finding, with one line per finding.

import { createRequire } from 'node:module';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import util from 'node:util';

const [modulesArg, repoArg, ...rest] = process.argv.slice(2);
if (!modulesArg || !repoArg || (rest.length > 0 && rest[0] !== '--expect-fail')) {
  console.error('usage: k8s-validate.mjs <node_modules dir> <repo root> [--expect-fail <tree>...]');
  process.exit(2);
}
const modulesDir = path.resolve(modulesArg);
const require = createRequire(path.join(modulesDir, 'noop.js'));
const YAML = require('yaml');
// Per validated tree (the repository, or a broken copy in the self-test); reset by validateTree.
let repoRoot = path.resolve(repoArg);
let deployDir = path.join(repoRoot, 'deploy');
let findings = [];
let usedFiles = new Set();
let useKubectl = !process.env.FQ_K8S_NO_KUBECTL;

function fail(where, msg) {
  findings.push(`${where}: ${msg}`);
}
const rel = (p) => path.relative(repoRoot, p);

// ---------------------------------------------------------------------------------------------
// YAML loading. YAML 1.1, as Kubernetes (sigs.k8s.io/yaml) reads it, so `0440` or `yes` mean here
// what they mean to the API server; duplicate keys are errors.
function loadDocs(file) {
  const text = fs.readFileSync(file, 'utf8');
  const docs = YAML.parseAllDocuments(text, { version: '1.1', uniqueKeys: true });
  const out = [];
  for (const d of docs) {
    for (const e of d.errors) fail(rel(file), `YAML error: ${e.message}`);
    const v = d.toJS({ maxAliasCount: 0 });
    if (v !== null && v !== undefined) out.push(v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Minimal kustomize. JSON 6902 ops per RFC 6902 (add, remove, replace, test; move/copy unused).

function decodePointer(p) {
  if (p === '') return [];
  if (!p.startsWith('/')) throw new Error(`bad JSON pointer ${p}`);
  return p.slice(1).split('/').map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
}

function applyOp(doc, op) {
  const parts = decodePointer(op.path);
  const last = parts.pop();
  let parent = doc;
  for (const k of parts) {
    if (parent === null || typeof parent !== 'object' || !(k in parent)) {
      throw new Error(`${op.op} ${op.path}: parent path does not exist`);
    }
    parent = parent[k];
  }
  const isArr = Array.isArray(parent);
  const idx = isArr ? (last === '-' ? parent.length : Number(last)) : last;
  if (isArr && (!Number.isInteger(idx) || idx < 0 || idx > parent.length)) {
    throw new Error(`${op.op} ${op.path}: bad array index`);
  }
  const exists = isArr ? idx < parent.length : Object.hasOwn(parent, idx);
  const value = structuredClone(op.value);
  switch (op.op) {
    case 'add':
      if (isArr) parent.splice(idx, 0, value);
      else parent[idx] = value;
      break;
    case 'replace':
      if (!exists) throw new Error(`replace ${op.path}: target does not exist`);
      parent[idx] = value;
      break;
    case 'remove':
      if (!exists) throw new Error(`remove ${op.path}: target does not exist`);
      if (isArr) parent.splice(idx, 1);
      else delete parent[idx];
      break;
    case 'test':
      if (!exists || !util.isDeepStrictEqual(parent[idx], op.value)) {
        throw new Error(`test ${op.path} failed: expected ${JSON.stringify(op.value)}, ` +
          `found ${JSON.stringify(exists ? parent[idx] : undefined)}`);
      }
      break;
    default:
      throw new Error(`unsupported JSON 6902 op ${op.op}`);
  }
}

function matchesTarget(obj, t) {
  const [group, version] = obj.apiVersion.includes('/') ? obj.apiVersion.split('/') : ['', obj.apiVersion];
  if (t.group !== undefined && t.group !== group) return false;
  if (t.version !== undefined && t.version !== version) return false;
  if (t.kind !== undefined && t.kind !== obj.kind) return false;
  if (t.name !== undefined && t.name !== obj.metadata?.name) return false;
  return true;
}

const KUSTOMIZATION_FIELDS = new Set(['apiVersion', 'kind', 'resources', 'components', 'patches']);
const TARGET_FIELDS = new Set(['group', 'version', 'kind', 'name']);

// Renders dir; `into` receives components' changes (a component patches its parent's objects).
function render(dir, into = null, stack = []) {
  if (stack.includes(dir)) throw new Error(`kustomization cycle at ${rel(dir)}`);
  const kfile = path.join(dir, 'kustomization.yaml');
  if (!fs.existsSync(kfile)) throw new Error(`${rel(dir)} has no kustomization.yaml`);
  usedFiles.add(kfile);
  const [k] = loadDocs(kfile);
  const where = rel(kfile);
  const isComponent = k.kind === 'Component';
  if (!(k.kind === 'Kustomization' && k.apiVersion === 'kustomize.config.k8s.io/v1beta1') &&
      !(isComponent && k.apiVersion === 'kustomize.config.k8s.io/v1alpha1')) {
    throw new Error(`${where}: expected Kustomization v1beta1 or Component v1alpha1`);
  }
  for (const f of Object.keys(k)) {
    if (!KUSTOMIZATION_FIELDS.has(f)) {
      throw new Error(`${where}: field '${f}' is not supported by this renderer (extend ` +
        'scripts/k8s-validate.mjs or use the supported subset)');
    }
  }
  const objs = isComponent ? into : [];
  for (const r of k.resources ?? []) {
    const p = path.resolve(dir, r);
    if (fs.statSync(p).isDirectory()) objs.push(...render(p, null, [...stack, dir]));
    else {
      usedFiles.add(p);
      for (const o of loadDocs(p)) objs.push(o);
    }
  }
  for (const c of k.components ?? []) render(path.resolve(dir, c), objs, [...stack, dir]);
  for (const [i, pt] of (k.patches ?? []).entries()) {
    const pw = `${where} patches[${i}]`;
    if (!pt.target) throw new Error(`${pw}: only JSON 6902 patches with a target are supported`);
    for (const f of Object.keys(pt.target)) {
      if (!TARGET_FIELDS.has(f)) throw new Error(`${pw}: unsupported target field ${f}`);
    }
    let ops;
    if (pt.path) {
      const pf = path.resolve(dir, pt.path);
      usedFiles.add(pf);
      [ops] = loadDocs(pf);
    } else {
      ops = YAML.parse(pt.patch, { version: '1.1' });
    }
    if (!Array.isArray(ops)) throw new Error(`${pw}: patch must be a JSON 6902 list of operations`);
    const targets = objs.filter((o) => matchesTarget(o, pt.target));
    if (targets.length === 0) throw new Error(`${pw}: target matches no object`);
    for (const o of targets) {
      for (const op of ops) {
        try {
          applyOp(o, op);
        } catch (e) {
          throw new Error(`${pw} on ${o.kind}/${o.metadata?.name}: ${e.message}`);
        }
      }
    }
  }
  return objs;
}

const keyOf = (o) => `${o.apiVersion} ${o.kind} ${o.metadata?.namespace ?? ''}/${o.metadata?.name}`;

// `kubectl kustomize` when it works here (it is absent on most machines: then only our renderer).
function kubectlRender(dir) {
  if (!useKubectl) return null;
  const r = spawnSync('kubectl', ['kustomize', dir], { encoding: 'utf8', timeout: 60000 });
  if (r.error || r.status !== 0) return null;
  return YAML.parseAllDocuments(r.stdout, { version: '1.1' }).map((d) => d.toJS()).filter(Boolean);
}

// ---------------------------------------------------------------------------------------------
// Strict field check: property tables from kubernetes-models' .d.ts files.
function buildTypeTable() {
  const table = new Map();  // global interface alias -> Map(field -> type text)
  const roots = [path.join(modulesDir, 'kubernetes-models'),
    path.join(modulesDir, '@kubernetes-models', 'apimachinery')];
  const parseDts = (file) => {
    const src = fs.readFileSync(file, 'utf8').replace(/\/\*[\s\S]*?\*\//g, '');
    const local = new Map();
    const re = /export interface (\w+)( extends TypeMeta)? \{/g;
    let m;
    while ((m = re.exec(src)) !== null) {
      let depth = 1;
      let i = re.lastIndex;
      const start = i;
      while (depth > 0 && i < src.length) {
        if (src[i] === '{') depth++;
        else if (src[i] === '}') depth--;
        i++;
      }
      const body = src.slice(start, i - 1);
      const fields = new Map();
      // Top-level members: `"name"?: Type;` where Type may contain nested braces.
      let d = 0;
      let cur = '';
      for (const ch of body) {
        if (ch === '{' || ch === '<') d++;
        if (ch === '}' || ch === '>') d--;
        if (ch === ';' && d === 0) {
          const mm = /^\s*"([^"]+)"\??:\s*([\s\S]*)$/.exec(cur);
          if (mm) fields.set(mm[1], mm[2].replace(/\s+/g, ' ').trim());
          cur = '';
        } else cur += ch;
      }
      // TypeMeta: the apiVersion and kind every top-level object carries.
      if (m[2]) for (const f of ['apiVersion', 'kind']) fields.set(f, 'string');
      local.set(m[1], fields);
    }
    const ex = /export \{([^}]*)\}/g;
    while ((m = ex.exec(src)) !== null) {
      for (const part of m[1].split(',')) {
        const am = /^\s*(\w+) as (\w+)\s*$/.exec(part);
        if (am && local.has(am[1])) table.set(am[2], local.get(am[1]));
      }
    }
  };
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.d.ts') && e.name !== 'index.d.ts') parseDts(p);
    }
  };
  for (const r of roots) walk(r);
  return table;
}

function strictCheck(table, typeName, value, where) {
  const t = typeName.trim();
  if (value === null || value === undefined) return;
  let m;
  if ((m = /^Array<(.*)>$/.exec(t))) {
    if (Array.isArray(value)) value.forEach((v, i) => strictCheck(table, m[1], v, `${where}[${i}]`));
    return;
  }
  if ((m = /^\{ \[key: string\]: (.*); \}$/.exec(t))) {
    if (value && typeof value === 'object') {
      for (const [k, v] of Object.entries(value)) strictCheck(table, m[1], v, `${where}.${k}`);
    }
    return;
  }
  const fields = table.get(t);
  if (!fields || typeof value !== 'object' || Array.isArray(value)) return;  // leaf or opaque
  for (const [k, v] of Object.entries(value)) {
    if (!fields.has(k)) fail(where, `unknown field '${k}' (not in ${t.replace(/^IIoK8s/, '')})`);
    else strictCheck(table, fields.get(k), v, `${where}.${k}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Models per apiVersion/kind.
const MODELS = {
  'apps/v1 Deployment': ['kubernetes-models/apps/v1', 'Deployment', 'IIoK8sApiAppsV1Deployment'],
  'v1 Service': ['kubernetes-models/v1', 'Service', 'IIoK8sApiCoreV1Service'],
  'v1 ConfigMap': ['kubernetes-models/v1', 'ConfigMap', 'IIoK8sApiCoreV1ConfigMap'],
  'v1 PersistentVolumeClaim': ['kubernetes-models/v1', 'PersistentVolumeClaim',
    'IIoK8sApiCoreV1PersistentVolumeClaim'],
  'autoscaling/v2 HorizontalPodAutoscaler': ['kubernetes-models/autoscaling/v2',
    'HorizontalPodAutoscaler', 'IIoK8sApiAutoscalingV2HorizontalPodAutoscaler'],
  'policy/v1 PodDisruptionBudget': ['kubernetes-models/policy/v1', 'PodDisruptionBudget',
    'IIoK8sApiPolicyV1PodDisruptionBudget'],
  'networking.k8s.io/v1 NetworkPolicy': ['kubernetes-models/networking.k8s.io/v1', 'NetworkPolicy',
    'IIoK8sApiNetworkingV1NetworkPolicy'],
};

function validateModel(table, o, where) {
  const spec = MODELS[`${o.apiVersion} ${o.kind}`];
  if (!spec) {
    if (o.apiVersion === 'monitoring.coreos.com/v1' && o.kind === 'ServiceMonitor') return;
    fail(where, `no validator for ${o.apiVersion} ${o.kind}`);
    return;
  }
  const [mod, cls, iface] = spec;
  if (!table.has(iface)) {
    fail(where, `internal: no field table for ${iface} (kubernetes-models layout changed?)`);
    return;
  }
  const Model = require(mod)[cls];
  try {
    new Model(structuredClone(o)).validate();
  } catch (e) {
    fail(where, `schema: ${e.message}`);
  }
  strictCheck(table, iface, o, where);
}

// ServiceMonitor (monitoring.coreos.com/v1): the fields this repo relies on, with their types.
function checkServiceMonitor(o, where) {
  const allowedSpec = new Set(['selector', 'endpoints', 'namespaceSelector', 'jobLabel',
    'targetLabels', 'podTargetLabels', 'sampleLimit']);
  const allowedEp = new Set(['port', 'targetPort', 'path', 'scheme', 'interval', 'scrapeTimeout',
    'tlsConfig', 'honorLabels', 'relabelings', 'metricRelabelings']);
  const s = o.spec;
  if (!s || typeof s !== 'object') return fail(where, 'spec missing');
  for (const k of Object.keys(s)) if (!allowedSpec.has(k)) fail(where, `unknown spec field '${k}'`);
  const ml = s.selector?.matchLabels;
  if (!ml || typeof ml !== 'object' || Object.keys(ml).length === 0) {
    fail(where, 'spec.selector.matchLabels must be a non-empty map');
  }
  if (!Array.isArray(s.endpoints) || s.endpoints.length === 0) {
    return fail(where, 'spec.endpoints must be a non-empty list');
  }
  const dur = /^([0-9]+(ms|s|m|h))+$/;
  s.endpoints.forEach((ep, i) => {
    const w = `${where} spec.endpoints[${i}]`;
    for (const k of Object.keys(ep)) if (!allowedEp.has(k)) fail(w, `unknown field '${k}'`);
    if (typeof ep.port !== 'string' || !ep.port) fail(w, 'port must be a Service port name');
    if (ep.path !== undefined && !String(ep.path).startsWith('/')) fail(w, 'path must start with /');
    for (const k of ['interval', 'scrapeTimeout']) {
      if (ep[k] !== undefined && !dur.test(ep[k])) fail(w, `${k} '${ep[k]}' is not a duration`);
    }
    if (ep.interval && ep.scrapeTimeout && toSec(ep.scrapeTimeout) > toSec(ep.interval)) {
      fail(w, 'scrapeTimeout exceeds interval');
    }
  });
}
function toSec(d) {
  const u = { ms: 0.001, s: 1, m: 60, h: 3600 };
  let t = 0;
  for (const m of d.matchAll(/([0-9]+)(ms|s|m|h)/g)) t += Number(m[1]) * u[m[2]];
  return t;
}

// ---------------------------------------------------------------------------------------------
// Cross-object checks on one rendering.
const selects = (sel, labels) =>
  sel && Object.keys(sel).length > 0 &&
  Object.entries(sel).every(([k, v]) => labels?.[k] === v);

// Flag names the server defines (ABSL_FLAG(type, name, ...) in server/*.cc), or null if
// server/main.cc has not landed yet. Abseil names are identifiers (data_dir); the server's
// NormalizeFlagArgs (server/options_flags.h) folds '-' to '_' in `--name`, so `--data-dir` is
// checked as data_dir when, and only when, that function is present.
function serverFlags() {
  const dir = path.join(repoRoot, 'server');
  if (!fs.existsSync(path.join(dir, 'main.cc'))) return null;
  const names = new Set();
  let folds = false;
  for (const f of fs.readdirSync(dir)) {
    if (!/\.(cc|h)$/.test(f)) continue;
    const src = fs.readFileSync(path.join(dir, f), 'utf8');
    for (const m of src.matchAll(/ABSL_FLAG\(\s*[^,]+,\s*(\w+)\s*,/g)) names.add(m[1]);
    if (/NormalizeFlagArgs\(/.test(src) && f === 'main.cc') folds = true;
  }
  return { names, has: (n) => names.has(folds ? n.replace(/-/g, '_') : n), size: names.size };
}

// The flags the image's ENTRYPOINT passes (the JSON array form in the Dockerfile).
function dockerEntrypoint() {
  const df = fs.readFileSync(path.join(repoRoot, 'Dockerfile'), 'utf8');
  const m = /^ENTRYPOINT\s+(\[.*\])\s*$/m.exec(df);
  if (!m) {
    fail('Dockerfile', 'ENTRYPOINT must be a JSON array (exec form)');
    return [];
  }
  return JSON.parse(m[1]);
}

// KV profile spec JSON (core/kv_profile.cc KvCompressionProfile::FromSpecJson): the structure
// only; the real parser runs in scripts/lint-deploy when a built server exists.
const SPEC_FIELDS = ['profile_id', 'shape', 'axis_policy', 'tokens_per_page', 'fibquant', 'fib_profile',
  'reserved_vector_bytes', 'protected', 'fallback', 'quality_budget', 'calibration_digest'];
const SPEC_REQUIRED = ['profile_id', 'shape', 'axis_policy', 'tokens_per_page'];
const SHAPE_FIELDS = ['schema_version', 'role', 'attention_kind', 'batch', 'layers', 'kv_heads',
  'query_heads', 'tokens', 'head_dim', 'dtype', 'rope_state'];
const FIBQUANT_FIELDS = ['ambient_dim', 'block_dim', 'codebook_size', 'seed', 'rotation_algorithm',
  'lloyd_restarts', 'lloyd_iterations', 'training_samples', 'empty_cell_policy'];
const ENUMS = {
  role: ['key', 'value'], attention_kind: ['mha', 'mqa', 'gqa'], dtype: ['f32', 'f16', 'bf16'],
  rope_state: ['pre_rope', 'post_rope', 'not_applicable'],
  axis_policy: ['raw', 'per_token', 'per_channel', 'role_aware_kivi_style'],
};

function checkProfileSpec(text, where) {
  let spec;
  try {
    spec = JSON.parse(text);
  } catch (e) {
    return fail(where, `not JSON: ${e.message}`);
  }
  const isObj = (v) => v && typeof v === 'object' && !Array.isArray(v);
  if (!isObj(spec)) return fail(where, 'not an object');
  const keys = (o, allowed, required, w) => {
    for (const k of Object.keys(o)) if (!allowed.includes(k)) fail(w, `unknown field '${k}'`);
    for (const k of required) if (!(k in o)) fail(w, `missing field '${k}'`);
  };
  const uint = (v) => Number.isInteger(v) && v > 0 && v < 2 ** 32;
  keys(spec, SPEC_FIELDS, SPEC_REQUIRED, where);
  if (typeof spec.profile_id !== 'string' || !spec.profile_id) fail(where, 'profile_id must be a string');
  if (!ENUMS.axis_policy.includes(spec.axis_policy)) fail(where, `axis_policy '${spec.axis_policy}' unknown`);
  if (!uint(spec.tokens_per_page)) fail(where, 'tokens_per_page must be a positive integer');
  const sh = spec.shape;
  if (!isObj(sh)) return fail(where, 'shape must be an object');
  keys(sh, SHAPE_FIELDS, SHAPE_FIELDS.filter((f) => f !== 'schema_version'), `${where} shape`);
  for (const f of ['batch', 'layers', 'kv_heads', 'query_heads', 'tokens', 'head_dim']) {
    if (!uint(sh[f])) fail(where, `shape.${f} must be a positive integer`);
  }
  for (const f of ['role', 'attention_kind', 'dtype', 'rope_state']) {
    if (!ENUMS[f].includes(sh[f])) fail(where, `shape.${f} '${sh[f]}' unknown`);
  }
  if (sh.role === 'value' && sh.rope_state !== 'not_applicable') fail(where, 'values take rope_state not_applicable');
  if (sh.role === 'key' && sh.rope_state === 'not_applicable') fail(where, 'keys are pre_rope or post_rope');
  if (sh.attention_kind === 'gqa' && sh.query_heads % sh.kv_heads !== 0) fail(where, 'query_heads % kv_heads != 0');
  if (spec.axis_policy === 'raw') {
    if ('fibquant' in spec || 'fib_profile' in spec) fail(where, 'axis_policy raw takes no fibquant parameters');
  } else if ('fibquant' in spec && 'fib_profile' in spec) {
    fail(where, 'give either fibquant or fib_profile, not both');
  } else if ('fib_profile' in spec) {
    if (!isObj(spec.fib_profile)) fail(where, 'fib_profile must be an object');
  } else {
    const fq = spec.fibquant;
    if (!isObj(fq)) return fail(where, 'fibquant parameters required (or a full fib_profile)');
    keys(fq, FIBQUANT_FIELDS, ['block_dim', 'codebook_size', 'seed'], `${where} fibquant`);
    const channel = spec.axis_policy === 'per_channel' ||
      (spec.axis_policy === 'role_aware_kivi_style' && sh.role === 'key');
    const ambient = fq.ambient_dim ?? (channel ? spec.tokens_per_page : sh.head_dim);
    if (!uint(fq.block_dim) || ambient % fq.block_dim !== 0) {
      fail(where, `fibquant.block_dim ${fq.block_dim} must divide the vector length ${ambient}`);
    }
    if (!(Number.isInteger(fq.codebook_size) && fq.codebook_size >= 2 && fq.codebook_size <= 2 ** 20)) {
      fail(where, 'fibquant.codebook_size must be in [2, 2^20]');
    }
    if (!Number.isInteger(fq.seed) || fq.seed < 0) fail(where, 'fibquant.seed must be a non-negative integer');
  }
}

function crossChecks(objs, name, flags, entrypoint) {
  const by = (kind) => objs.filter((o) => o.kind === kind);
  const deps = by('Deployment');
  const svcs = by('Service');
  if (deps.length !== 1) return fail(name, `expected 1 Deployment, found ${deps.length}`);
  const dep = deps[0];
  const dw = `${name} Deployment/${dep.metadata.name}`;
  const pod = dep.spec.template;
  const podLabels = pod.metadata?.labels ?? {};
  if (!selects(dep.spec.selector?.matchLabels, podLabels)) fail(dw, 'selector does not match pod labels');
  const hpa = objs.find((o) => o.kind === 'HorizontalPodAutoscaler');
  if (hpa && hpa.spec.maxReplicas > 1 && dep.spec.replicas !== undefined) {
    fail(dw, 'spec.replicas is set although the HPA scales it (every apply would reset the count)');
  }
  const ps = pod.spec;
  const ctr = ps.containers.find((c) => c.name === 'server');
  if (!ctr) return fail(dw, "no container named 'server'");
  const portsByName = new Map((ctr.ports ?? []).map((p) => [p.name, p.containerPort]));
  const portNums = new Set((ctr.ports ?? []).map((p) => p.containerPort));
  const resolvePort = (p) => (typeof p === 'string' ? portsByName.get(p) : (portNums.has(p) ? p : undefined));

  // Image flags: command (if set) replaces the ENTRYPOINT; args are appended.
  const argv = [...(ctr.command ?? entrypoint), ...(ctr.args ?? [])];
  const flagVal = (f) => {
    let v;
    for (const a of argv) if (a.startsWith(`--${f}=`)) v = a.slice(f.length + 3);
    return v;
  };
  for (const a of argv.slice(1)) {
    const m = /^--([a-z0-9_-]+)(=|$)/.exec(a);
    if (!m) fail(dw, `argument '${a}' is not a --flag[=value]`);
    else if (flags && !flags.has(m[1])) {
      fail(dw, `flag --${m[1]} is not defined by the server (server/*.cc)`);
    }
  }
  const listenPort = Number(flagVal('listen')?.split(':').pop());
  if (!portNums.has(listenPort)) fail(dw, `--listen port ${listenPort} is not a container port`);
  if (portsByName.get('grpc') !== listenPort) fail(dw, `container port 'grpc' != --listen port ${listenPort}`);
  const mp = Number((flagVal('metrics-listen') ?? '').split(':').pop());
  if (portsByName.get('metrics') !== mp) fail(dw, `container port 'metrics' != --metrics-listen port ${mp}`);
  const tls = argv.some((a) => a.startsWith('--tls-cert='));
  if (tls && argv.includes('--allow-insecure')) fail(dw, 'TLS deployment still passes --allow-insecure');
  if (tls !== argv.some((a) => a.startsWith('--tls-key='))) fail(dw, '--tls-cert and --tls-key go together');

  // Mounted paths the flags point at.
  const mounts = new Map((ctr.volumeMounts ?? []).map((m) => [m.mountPath, m]));
  const vols = new Map((ps.volumes ?? []).map((v) => [v.name, v]));
  for (const m of ctr.volumeMounts ?? []) if (!vols.has(m.name)) fail(dw, `mount of unknown volume ${m.name}`);
  const under = (p) => [...mounts.keys()].find((mp2) => p === mp2 || p.startsWith(`${mp2}/`));
  for (const f of ['data-dir', 'preload-dir', 'tls-cert', 'tls-key', 'tls-client-ca']) {
    const v = flagVal(f);
    if (v !== undefined && !under(v)) fail(dw, `--${f}=${v} is not on a mounted volume`);
  }
  if (ctr.securityContext?.readOnlyRootFilesystem !== true) fail(dw, 'root filesystem must be read-only');
  const dataMount = mounts.get(flagVal('data-dir'));
  if (!dataMount || dataMount.readOnly) fail(dw, 'the data dir must be a writable mount');
  const preload = mounts.get(flagVal('preload-dir'));
  const cmVol = preload && vols.get(preload.name)?.configMap;
  if (!cmVol) fail(dw, 'the preload dir must be a ConfigMap volume');
  else {
    const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name === cmVol.name);
    if (!cm) fail(dw, `ConfigMap ${cmVol.name} (preload dir) is not in the rendering`);
    else {
      const keys = Object.keys(cm.data ?? {});
      if (keys.length === 0) fail(`${name} ConfigMap/${cm.metadata.name}`, 'no profile specs');
      for (const key of keys) {
        const w = `${name} ConfigMap/${cm.metadata.name} ${key}`;
        if (!key.endsWith('.json')) fail(w, 'profile spec keys must end in .json');
        checkProfileSpec(cm.data[key], w);
      }
      // The base ships the project's default profiles (server/default-profiles/, preloaded by
      // `make run` and the image): the two copies must say the same (as JSON values).
      const defaults = path.join(repoRoot, 'server', 'default-profiles');
      if (name === 'deploy/base' && fs.existsSync(defaults)) {
        const files = fs.readdirSync(defaults).filter((f) => f.endsWith('.json')).sort();
        const w = `${name} ConfigMap/${cm.metadata.name}`;
        if (JSON.stringify(files) !== JSON.stringify([...keys].sort())) {
          fail(w, `keys ${keys.join(', ')} != server/default-profiles files ${files.join(', ')}`);
        }
        for (const f of files) {
          let same = false;
          try {
            same = util.isDeepStrictEqual(JSON.parse(fs.readFileSync(path.join(defaults, f), 'utf8')),
              JSON.parse(cm.data[f] ?? 'null'));
          } catch {
            same = false;
          }
          if (!same) fail(w, `${f} differs from server/default-profiles/${f} (copy it over)`);
        }
      }
    }
  }
  for (const [vn, v] of vols) {
    if (v.secret && !v.secret.secretName) fail(dw, `secret volume ${vn} without secretName`);
    if (v.persistentVolumeClaim) {
      const claim = v.persistentVolumeClaim.claimName;
      if (!objs.some((o) => o.kind === 'PersistentVolumeClaim' && o.metadata.name === claim)) {
        fail(dw, `PersistentVolumeClaim ${claim} is not in the rendering`);
      }
    }
  }

  // The image is pinned: a tag other than latest (or a digest).
  const image = String(ctr.image ?? '');
  if (!/@sha256:[0-9a-f]{64}$/.test(image) && !/:[A-Za-z0-9_][A-Za-z0-9_.-]*$/.test(image.split('/').pop())) {
    fail(dw, `image '${image}' has no tag (pin it)`);
  } else if (image.endsWith(':latest')) fail(dw, `image '${image}' uses the tag latest (pin it)`);

  // Security context: non-root with a numeric uid (the image's USER is numeric too).
  const psc = ps.securityContext ?? {};
  if (psc.runAsNonRoot !== true || !(psc.runAsUser > 0)) fail(dw, 'pod must run as a non-root numeric uid');
  if (ctr.securityContext?.allowPrivilegeEscalation !== false) fail(dw, 'allowPrivilegeEscalation must be false');

  // Probes: ports exist; gRPC probes name the service (readiness/startup) and cannot be used
  // with TLS on the port (the kubelet's gRPC probe is plaintext).
  for (const pn of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
    const p = ctr[pn];
    if (!p) {
      fail(dw, `${pn} missing`);
      continue;
    }
    const act = p.grpc ?? p.tcpSocket ?? p.httpGet;
    if (act && resolvePort(act.port) === undefined) fail(dw, `${pn} port ${act.port} is not a container port`);
    // With TLS only an exec probe can ask the health service (the kubelet's gRPC probe is
    // plaintext; a TCP probe cannot see NOT_SERVING): `fibquant health` with mounted certificates.
    if (tls && !p.exec) fail(dw, `${pn}: a TLS deployment needs an exec probe (fibquant health)`);
    if (p.exec) {
      const cmd = p.exec.command ?? [];
      const opt = (f) => cmd.find((a) => a.startsWith(`--${f}=`))?.slice(f.length + 3);
      if (cmd[0] !== '/usr/local/bin/fibquant' || cmd[1] !== 'health') {
        fail(dw, `${pn}: exec probe must run /usr/local/bin/fibquant health, got ${cmd.slice(0, 2).join(' ')}`);
      }
      const svc = cmd.length > 2 && !cmd[2].startsWith('--') ? cmd[2] : 'fibquant.v1.KvCompressionService';
      if (pn !== 'livenessProbe' && svc !== 'fibquant.v1.KvCompressionService') {
        fail(dw, `${pn} must check service fibquant.v1.KvCompressionService`);
      }
      const target = Number((opt('server') ?? '').split(':').pop());
      if (target !== listenPort) fail(dw, `${pn}: --server port ${target} is not the --listen port ${listenPort}`);
      if (tls) {
        for (const f of ['tls-ca', 'tls-cert', 'tls-key']) {
          const v = opt(f);
          if (v === undefined) fail(dw, `${pn}: exec probe without --${f} on a TLS port`);
          else if (!under(v)) fail(dw, `${pn}: --${f}=${v} is not on a mounted volume`);
        }
        if (flagVal('tls-cert') !== opt('tls-cert')) fail(dw, `${pn}: the probe should present the pod's own certificate (--tls-cert)`);
      }
      if (!(p.timeoutSeconds >= 2)) fail(dw, `${pn}: an exec probe needs timeoutSeconds >= 2 (process start + handshake)`);
    }
    if (p.grpc) {
      if (tls && resolvePort(p.grpc.port) === listenPort) fail(dw, `${pn}: gRPC probe on the TLS port cannot work`);
      if (pn !== 'livenessProbe' && p.grpc.service !== 'fibquant.v1.KvCompressionService') {
        fail(dw, `${pn} must check service fibquant.v1.KvCompressionService`);
      }
    }
  }

  // Drain arithmetic: grace >= preStop sleep + --drain-seconds + 1 s margin.
  const drain = Number(flagVal('drain-seconds'));
  const grace = ps.terminationGracePeriodSeconds;
  const pre = ctr.lifecycle?.preStop?.exec?.command;
  const sleep = pre && pre[0] === 'sleep' ? Number(pre[1]) : (ctr.lifecycle?.preStop?.sleep?.seconds ?? 0);
  if (!Number.isFinite(drain)) fail(dw, '--drain-seconds must be set explicitly');
  else if (!(grace >= sleep + drain + 1)) {
    fail(dw, `terminationGracePeriodSeconds ${grace} < preStop ${sleep} s + drain ${drain} s + margin`);
  }
  // HPA on CPU needs a CPU request; --workers should not exceed the CPU limit.
  const req = ctr.resources?.requests ?? {};
  const lim = ctr.resources?.limits ?? {};
  for (const r of ['cpu', 'memory']) {
    if (req[r] === undefined || lim[r] === undefined) fail(dw, `resources.requests/limits.${r} must be set`);
  }
  const cpu = (q) => (String(q).endsWith('m') ? Number(String(q).slice(0, -1)) / 1000 : Number(q));
  const workers = Number(flagVal('workers'));
  if (Number.isFinite(workers) && lim.cpu !== undefined && workers > Math.ceil(cpu(lim.cpu))) {
    fail(dw, `--workers=${workers} exceeds the CPU limit ${lim.cpu}`);
  }

  // Services select the pods; named target ports exist.
  for (const s of svcs) {
    const w = `${name} Service/${s.metadata.name}`;
    if (!selects(s.spec.selector, podLabels)) fail(w, 'selector does not match the pods');
    for (const p of s.spec.ports ?? []) {
      if (resolvePort(p.targetPort ?? p.port) === undefined) fail(w, `targetPort ${p.targetPort} is not a container port`);
      if (tls && p.name === 'grpc' && p.appProtocol === 'kubernetes.io/h2c') fail(w, 'TLS port marked h2c');
    }
  }
  if (!svcs.some((s) => s.spec.clusterIP === 'None')) fail(name, 'no headless Service');
  for (const h of by('HorizontalPodAutoscaler')) {
    const w = `${name} HorizontalPodAutoscaler/${h.metadata.name}`;
    const t = h.spec.scaleTargetRef;
    if (t.kind !== 'Deployment' || t.name !== dep.metadata.name || t.apiVersion !== 'apps/v1') {
      fail(w, 'scaleTargetRef is not the Deployment');
    }
    if (h.spec.minReplicas > h.spec.maxReplicas) fail(w, 'minReplicas > maxReplicas');
    if (req.cpu === undefined && h.spec.metrics?.some((m) => m.resource?.name === 'cpu')) {
      fail(w, 'CPU utilization target without a CPU request');
    }
  }
  for (const p of by('PodDisruptionBudget')) {
    if (!selects(p.spec.selector?.matchLabels, podLabels)) fail(`${name} PodDisruptionBudget/${p.metadata.name}`, 'selector does not match the pods');
  }
  for (const n of by('NetworkPolicy')) {
    const w = `${name} NetworkPolicy/${n.metadata.name}`;
    if (!selects(n.spec.podSelector?.matchLabels, podLabels)) fail(w, 'podSelector does not match the pods');
    for (const r of n.spec.ingress ?? []) {
      for (const p of r.ports ?? []) if (resolvePort(p.port) === undefined) fail(w, `port ${p.port} is not a container port`);
    }
    const allowed = new Set((n.spec.ingress ?? []).flatMap((r) => (r.ports ?? []).map((p) => resolvePort(p.port))));
    if (!allowed.has(listenPort)) fail(w, 'gRPC port not reachable');
  }
  for (const sm of by('ServiceMonitor')) {
    const w = `${name} ServiceMonitor/${sm.metadata.name}`;
    const hit = svcs.filter((s) => selects(sm.spec?.selector?.matchLabels, s.metadata.labels));
    if (hit.length !== 1) fail(w, `selects ${hit.length} Services (want exactly 1: one scrape per pod)`);
    for (const ep of sm.spec?.endpoints ?? []) {
      if (!hit.every((s) => s.spec.ports?.some((p) => p.name === ep.port))) fail(w, `port ${ep.port} not on the selected Service`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
const table = buildTypeTable();

// Validates one tree; returns its findings and a summary line.
function validateTree(root) {
  repoRoot = path.resolve(root);
  deployDir = path.join(repoRoot, 'deploy');
  findings = [];
  usedFiles = new Set();
  if (table.size < 500) fail('kubernetes-models', `only ${table.size} types parsed from .d.ts (layout changed?)`);
  const flags = serverFlags();
  if (flags !== null && flags.size === 0) fail('server/*.cc', 'no flag definitions found (flag check cannot run)');
  const entrypoint = dockerEntrypoint();

  // Every directory with a kustomization.yaml under deploy/base and deploy/overlays is rendered;
  // components are rendered through the overlays that use them.
  const targets = [path.join(deployDir, 'base')];
  const ov = path.join(deployDir, 'overlays');
  if (fs.existsSync(ov)) {
    for (const d of fs.readdirSync(ov).sort()) targets.push(path.join(ov, d));
  }
  let kubectlUsed = 0;
  let objects = 0;
  for (const dir of targets) {
    const name = rel(dir);
    let objs;
    try {
      objs = render(dir);
    } catch (e) {
      fail(name, `render: ${e.message}`);
      continue;
    }
    const seen = new Set();
    for (const o of objs) {
      const w = `${name} ${o.kind}/${o.metadata?.name}`;
      if (seen.has(keyOf(o))) fail(w, 'duplicate object');
      seen.add(keyOf(o));
      if (!o.metadata?.labels?.['app.kubernetes.io/part-of']) fail(w, 'label app.kubernetes.io/part-of missing');
      validateModel(table, o, w);
      if (o.kind === 'ServiceMonitor') checkServiceMonitor(o, w);
    }
    try {
      crossChecks(objs, name, flags, entrypoint);
    } catch (e) {
      fail(name, `cross-checks crashed on a malformed object: ${e.message}`);
    }
    objects += objs.length;
    const k = kubectlRender(dir);
    if (k !== null) {
      kubectlUsed++;
      const a = new Map(objs.map((o) => [keyOf(o), o]));
      const b = new Map(k.map((o) => [keyOf(o), o]));
      for (const key of new Set([...a.keys(), ...b.keys()])) {
        if (!util.isDeepStrictEqual(a.get(key), b.get(key))) {
          fail(name, `kubectl kustomize and this renderer disagree on ${key}`);
        }
      }
    }
  }

  // Every YAML file under deploy/ must be part of some rendering (else nothing validates it).
  const walkYaml = (d) => fs.readdirSync(d, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walkYaml(path.join(d, e.name)) : (/\.ya?ml$/.test(e.name) ? [path.join(d, e.name)] : []));
  for (const f of walkYaml(deployDir)) {
    if (!usedFiles.has(f)) fail(rel(f), 'not referenced by any rendered kustomization (unvalidated)');
  }
  const summary = `${targets.length} renderings, ${objects} objects, ${usedFiles.size} files, ` +
    `${table.size} field tables, server flags ${flags === null ? 'not checked (no server/main.cc)' :
      `checked (${flags.size} defined)`}; kubectl kustomize cross-check: ` +
    `${kubectlUsed ? `${kubectlUsed} renderings identical` : 'not available or disabled'}`;
  return { findings, summary };
}

const main = validateTree(repoArg);
console.log(`k8s-validate: ${main.summary}`);
for (const f of main.findings) console.error(`FAIL ${f}`);
let bad = main.findings.length;

// Self-test: each tree after --expect-fail is a deliberately broken copy; it must be rejected.
useKubectl = false;  // the renderer is already cross-checked on the real tree
let caught = 0;
for (const tree of rest.slice(1)) {
  const r = validateTree(tree);
  if (r.findings.length === 0) {
    console.error(`FAIL self-test: broken tree ${tree} passed validation`);
    bad++;
  } else {
    caught++;
    if (process.env.FQ_K8S_VERBOSE) console.log(`  ${path.basename(tree)}: ${r.findings[0]}`);
  }
}
if (rest.length > 1) console.log(`k8s-validate: self-test: ${caught}/${rest.length - 1} broken trees rejected`);
process.exit(bad ? 1 : 0);
