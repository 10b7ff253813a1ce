// shoal OAuth 2.1 test authorization server (client_credentials + RFC 8707 resource
// indicators + JWT access tokens), built on oidc-provider. Loopback/test use only.
//
// Configuration (argv > env > --config file > defaults):
//   --port N        | PORT              listen port (0 = pick a free one; default 0)
//   --host H        | HOST              listen host (default 127.0.0.1)
//   --issuer URL    | ISSUER            default http://HOST:<actual port>
//   --resource URI  | RESOURCES         accepted resource indicators (repeat flag, or
//                                       comma/space separated). '*' matches within one
//                                       URL segment, e.g. http://127.0.0.1:*/mcp
//   --ttl S         | ACCESS_TOKEN_TTL  default access token lifetime, seconds (300)
//   --alg A         | SIGNING_ALG       ES256 (default) or RS256
//   --clients JSON  | CLIENTS           [{"client_id","client_secret","scopes":[..],"ttl"?}]
//   --config FILE   | CONFIG_FILE       JSON file with any of: port, host, issuer,
//                                       resources, accessTokenTtl, alg, clients
//   RIG_VERBOSE=1   show oidc-provider notices/warnings and a request log (stderr)
//
// stdout carries exactly one line, `READY <issuer>`; everything else goes to stderr.
//
// Test-only admin endpoints (loopback callers only), outside oidc-provider:
//   POST /__admin/rotate[?retire_old=1]  new signing key + kid; old keys stay in JWKS
//                                        unless retire_old=1. Also on SIGUSR2.
//   GET  /__admin/state                  issuer, current kid, published kids, resources
//   POST /__admin/resources              body {"add":[...]} or {"set":[...]}
//   POST /__admin/mint                   body {"claims":{..},"ttl":-60,"header":{..},
//                                        "key":"current"|"unpublished"} -> forged JWT
//                                        signed directly (for negative tests)

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

const verbose = process.env.RIG_VERBOSE === '1';

// ---- keep stdout clean: oidc-provider prints notices with console.info (stdout) ----
const toStderr = (...a) => process.stderr.write(a.map(String).join(' ') + '\n');
const quiet = (...a) => {
  if (!verbose && /^oidc-provider (NOTICE|WARNING)/.test(String(a[0]).replace(/\x1b\[[0-9;]*m/g, ''))) return;
  toStderr(...a);
};
console.log = toStderr;
console.info = quiet;
console.warn = quiet;
const log = (...a) => toStderr('[oidc-rig]', ...a);

// dynamic import so the console patch above is in place before the module loads
const { default: Provider, errors } = await import('oidc-provider');

// ---------------------------------- config ----------------------------------
const { values: argv } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string' },
    issuer: { type: 'string' },
    resource: { type: 'string', multiple: true },
    ttl: { type: 'string' },
    alg: { type: 'string' },
    clients: { type: 'string' },
    config: { type: 'string' },
  },
});
const env = process.env;
const file = (argv.config || env.CONFIG_FILE)
  ? JSON.parse(fs.readFileSync(argv.config || env.CONFIG_FILE, 'utf8')) : {};
const splitList = (s) => s.split(/[\s,]+/).filter(Boolean);

const cfg = {
  port: Number(argv.port ?? env.PORT ?? file.port ?? 0),
  host: argv.host ?? env.HOST ?? file.host ?? '127.0.0.1',
  issuer: argv.issuer ?? env.ISSUER ?? file.issuer,
  resources: argv.resource?.flatMap(splitList)
    ?? (env.RESOURCES ? splitList(env.RESOURCES) : file.resources)
    ?? ['http://127.0.0.1:*/mcp'],
  ttl: Number(argv.ttl ?? env.ACCESS_TOKEN_TTL ?? file.accessTokenTtl ?? 300),
  alg: argv.alg ?? env.SIGNING_ALG ?? file.alg ?? 'ES256',
  clients: JSON.parse(argv.clients ?? env.CLIENTS ?? 'null') ?? file.clients ?? [
    { client_id: 'shoal-test', client_secret: 'shoal-test-secret', scopes: ['mcp:tools', 'mcp:admin'] },
    { client_id: 'shoal-short', client_secret: 'shoal-short-secret', scopes: ['mcp:tools'], ttl: 1 },
  ],
};
if (!['ES256', 'RS256'].includes(cfg.alg)) throw new Error(`unsupported SIGNING_ALG ${cfg.alg}`);
const clientById = new Map(cfg.clients.map((c) => [c.client_id, c]));
const allScopes = [...new Set(cfg.clients.flatMap((c) => c.scopes ?? []))];

let resourcePatterns = [];
const setResources = (list) => {
  cfg.resources = [...new Set(list)];
  resourcePatterns = cfg.resources.map((r) => new RegExp(
    `^${r.split('*').map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('[^/?#]*')}$`,
  ));
};
setResources(cfg.resources);
const resourceAccepted = (uri) => resourcePatterns.some((re) => re.test(uri));

// ----------------------------------- keys -----------------------------------
let keyCounter = 0;
function newKey(prefix = 'rig') {
  const { privateKey } = cfg.alg === 'ES256'
    ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  if (prefix === 'rig') keyCounter += 1;
  const kid = `${prefix}-${keyCounter}-${crypto.randomBytes(4).toString('hex')}`;
  return { kid, privateKey, jwk: { ...privateKey.export({ format: 'jwk' }), kid, alg: cfg.alg, use: 'sig' } };
}
// keys[0] is the active signing key; the rest are published for verification only.
let keys = [newKey()];

// ------------------------------ provider factory ------------------------------
let issuer;
let current; // { provider, handler }

function buildProvider() {
  const configuration = {
    jwks: { keys: keys.map((k) => structuredClone(k.jwk)) },
    clients: cfg.clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: (c.scopes ?? []).join(' '),
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    })),
    clientDefaults: { id_token_signed_response_alg: cfg.alg },
    scopes: allScopes,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => false,
        getResourceServerInfo(ctx, resourceIndicator, client) {
          if (!resourceAccepted(resourceIndicator)) {
            throw new errors.InvalidTarget(`resource ${resourceIndicator} is not accepted by this AS`);
          }
          const c = clientById.get(client.clientId);
          return {
            audience: resourceIndicator,
            scope: (c?.scopes ?? []).join(' '),
            accessTokenTTL: c?.ttl ?? cfg.ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: cfg.alg, kid: keys[0].kid } },
          };
        },
      },
    },
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? cfg.ttl,
      ClientCredentials: (ctx, token, client) => clientById.get(client.clientId)?.ttl ?? cfg.ttl,
      Grant: 3600,
      Interaction: 600,
      Session: 3600,
      IdToken: 3600,
    },
    // opaque-token / interaction defaults we never use, set to avoid notices
    clientBasedCORS: () => false,
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  };
  const provider = new Provider(issuer, configuration);
  if (verbose) {
    provider.on('grant.error', (ctx, err) => log('grant.error', err.name, err.message, err.error_description ?? ''));
    provider.on('server_error', (ctx, err) => log('server_error', err.stack));
  }
  return { provider, handler: provider.callback() };
}

function rotate({ retireOld = false } = {}) {
  const k = newKey();
  keys = retireOld ? [k] : [k, ...keys].slice(0, 5);
  current = buildProvider();
  log(`rotated: signing kid=${k.kid}; published kids=${keys.map((x) => x.kid).join(',')}`);
  return state();
}

const state = () => ({
  issuer,
  alg: cfg.alg,
  current_kid: keys[0].kid,
  published_kids: keys.map((k) => k.kid),
  resources: cfg.resources,
  clients: cfg.clients.map(({ client_id, scopes, ttl }) => ({ client_id, scopes, ttl: ttl ?? cfg.ttl })),
});

// ------------------------- test-only forged tokens -------------------------
const b64u = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');
let unpublished; // a key never put in JWKS, for "unknown kid / bad signature" tests
function mint({ claims = {}, ttl = cfg.ttl, header = {}, key = 'current' } = {}) {
  let k = keys[0];
  if (key === 'unpublished') { unpublished ??= newKey('unpublished'); k = unpublished; }
  const now = Math.floor(Date.now() / 1000);
  const c0 = cfg.clients[0];
  const payload = {
    iss: issuer,
    aud: cfg.resources.find((r) => !r.includes('*')),
    sub: c0?.client_id,
    client_id: c0?.client_id,
    scope: (c0?.scopes ?? []).join(' '),
    jti: crypto.randomBytes(16).toString('base64url'),
    iat: now,
    exp: now + Number(ttl),
    ...claims,
  };
  for (const [n, v] of Object.entries(payload)) if (v === null) delete payload[n];
  const hdr = { alg: cfg.alg, typ: 'at+jwt', kid: k.kid, ...header };
  const input = `${b64u(hdr)}.${b64u(payload)}`;
  const sig = crypto.sign('sha256', Buffer.from(input), cfg.alg === 'ES256'
    ? { key: k.privateKey, dsaEncoding: 'ieee-p1363' } : k.privateKey);
  return { access_token: `${input}.${sig.toString('base64url')}`, header: hdr, payload };
}

// ---------------------------------- server ----------------------------------
const readJson = (req) => new Promise((resolve, reject) => {
  let body = '';
  req.on('data', (d) => { body += d; });
  req.on('end', () => { try { resolve(body ? JSON.parse(body) : {}); } catch (e) { reject(e); } });
  req.on('error', reject);
});
const sendJson = (res, status, obj) => {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(obj, null, 2) + '\n');
};
const isLoopback = (a) => a === '127.0.0.1' || a === '::1' || a === '::ffff:127.0.0.1';

async function admin(req, res, url) {
  if (!isLoopback(req.socket.remoteAddress)) return sendJson(res, 403, { error: 'forbidden' });
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /__admin/state': return sendJson(res, 200, state());
    case 'POST /__admin/rotate': return sendJson(res, 200, rotate({ retireOld: url.searchParams.get('retire_old') === '1' }));
    case 'POST /__admin/resources': {
      const b = await readJson(req);
      setResources(b.set ?? [...cfg.resources, ...(b.add ?? [])]);
      return sendJson(res, 200, state());
    }
    case 'POST /__admin/mint': return sendJson(res, 200, mint(await readJson(req)));
    default: return sendJson(res, 404, { error: 'not_found' });
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (verbose) res.on('finish', () => log(req.method, req.url, res.statusCode));
  if (url.pathname.startsWith('/__admin/')) {
    admin(req, res, url).catch((e) => sendJson(res, 400, { error: 'bad_request', error_description: e.message }));
    return;
  }
  if (!current) { sendJson(res, 503, { error: "starting" }); return; }
  current.handler(req, res); // always the provider instance of the latest key rotation
});

process.on('SIGUSR2', () => { if (issuer) rotate(); });
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => { server.close(); process.exit(0); });

server.listen(cfg.port, cfg.host, () => {
  const { port } = server.address();
  const hostForUrl = cfg.host.includes(':') ? `[${cfg.host}]` : cfg.host;
  issuer = cfg.issuer ?? `http://${hostForUrl}:${port}`;
  current = buildProvider();
  log(`oidc-provider issuer=${issuer} alg=${cfg.alg} kid=${keys[0].kid} resources=${cfg.resources.join(',')}`
    + ` clients=${cfg.clients.map((c) => c.client_id).join(',')} node=${process.version}`);
  process.stdout.write(`READY ${issuer}\n`);
});
