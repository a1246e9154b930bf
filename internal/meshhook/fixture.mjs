// MeshHook fixture generator, run by internal/meshhook's Generate with Node 20+
// (node:crypto only, no npm):
//
//   SECRETS_ENCRYPTION_KEY=<64 hex> FIXTURE_ROWS=20000 FIXTURE_PROJECTS=50 \
//   FIXTURE_V1=8000 FIXTURE_LOOKALIKE=1200 FIXTURE_FORGED=0 node --input-type=module - < fixture.mjs
//
// stdout: one JSON object per line (NDJSON). First the projects:
//   {"project": "<uuid>", "owner": "<uuid>", "name": "..."}
// then the secrets rows:
//   {"project": "<uuid>", "key": "...", "stored": "<base64 of value_encrypted>",
//    "plaintext": "<base64>", "kind": "plain" | "lookalike" | "v1" | "forged"}
//
// Kinds, with exact counts (the rest of FIXTURE_ROWS is "plain"):
//   v1        MeshHook's v1:<iv>:<tag>:<ct> (standard base64 each), AES-256-GCM,
//             a random 12-byte IV, 16-byte tag, no associated data, as MeshHook
//             encrypts; plaintext is what it decrypts to.
//   lookalike a plaintext that starts with "v1:" but has no well-formed v1 header
//             (wrong IV or tag length, bad or non-canonical base64, too few
//             fields): stored is the plaintext itself.
//   forged    a plaintext with a well-formed header whose tag does not verify
//             (a real v1 value with one tag bit flipped): stored is the
//             plaintext itself, but a v1 decoder claims it and must refuse it.
//   plain     an ordinary plaintext: tokens, webhook secrets, JSON, Unicode,
//             the empty string, values up to 4 KiB.
// Rows are spread evenly over the projects, kinds shuffled among them.
import { createCipheriv, randomBytes, randomInt, randomUUID } from 'node:crypto';

const env = (name, def) => {
  const v = process.env[name];
  if (v === undefined || v === '') return def;
  if (!/^[0-9]+$/.test(v)) throw new Error(`${name} must be a non-negative integer`);
  return Number(v);
};
const keyHex = process.env.SECRETS_ENCRYPTION_KEY ?? '';
if (!/^[0-9a-fA-F]{64}$/.test(keyHex)) throw new Error('SECRETS_ENCRYPTION_KEY must be 64 hex characters');
const key = Buffer.from(keyHex, 'hex');
const rows = env('FIXTURE_ROWS', 20000);
const nProjects = env('FIXTURE_PROJECTS', 50);
const nV1 = env('FIXTURE_V1', Math.round(rows * 0.4));
const nLook = env('FIXTURE_LOOKALIKE', Math.round(rows * 0.06));
const nForged = env('FIXTURE_FORGED', 0);
if (nProjects < 1 || nV1 + nLook + nForged > rows) throw new Error('FIXTURE_*: counts do not fit');

function encrypt(plaintext) {
  const iv = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, iv);
  const ct = Buffer.concat([c.update(plaintext), c.final()]);
  return { iv, tag: c.getAuthTag(), ct };
}
const b64 = (b) => Buffer.from(b).toString('base64');
const v1 = ({ iv, tag, ct }) => `v1:${b64(iv)}:${b64(tag)}:${b64(ct)}`;
const hex = (n) => randomBytes(n).toString('hex');
const alnum = (n) => randomBytes(n).toString('base64').replace(/[^A-Za-z0-9]/g, 'x').slice(0, n);

const plains = [
  () => `whsec_${alnum(32)}`,
  () => `sk_live_${alnum(24)}`,
  () => `ghp_${alnum(36)}`,
  () => `xoxb-${randomInt(1e9)}-${randomInt(1e9)}-${alnum(24)}`,
  () => JSON.stringify({ client_id: hex(8), client_secret: alnum(40), scopes: ['read', 'write'] }),
  () => `pässwörd ✓ ${alnum(12)} 秘密`,
  () => '',
  () => alnum(randomInt(1, 4096)),
  () => `postgres://svc:${alnum(20)}@db.internal:5432/app`,
  () => `token:with:colons:${alnum(10)}`,
];
function plain() {
  return Buffer.from(plains[randomInt(plains.length)](), 'utf8');
}

// Each is a value starting with "v1:" that a strict v1 parser does not claim.
const lookalikes = [
  () => 'v1:',
  () => `v1:${alnum(3)}:${alnum(3)}:${alnum(3)}`,
  () => { const e = encrypt(plain()); return `v1:${b64(randomBytes(8))}:${b64(e.tag)}:${b64(e.ct)}`; }, // 8-byte IV
  () => { const e = encrypt(plain()); return `v1:${b64(e.iv)}:${b64(e.tag.subarray(0, 15))}:${b64(e.ct)}`; }, // 15-byte tag
  () => { const e = encrypt(plain()); return `v1:${b64(e.iv).slice(0, 15)}!:${b64(e.tag)}:${b64(e.ct)}`; }, // bad base64
  () => { const e = encrypt(plain()); return `v1:${e.iv.toString('base64url')}-_:${b64(e.tag)}:${b64(e.ct)}`; }, // URL alphabet
  () => { const e = encrypt(plain()); return `v1:${b64(e.iv)}:${b64(e.tag).replace(/=+$/, '')}:${b64(e.ct)}`; }, // unpadded tag
  () => { const e = encrypt(plain()); return `v1:${b64(e.iv)}:${b64(e.tag)}`; }, // no ciphertext field
  () => `v1:${alnum(16)}`,
];

function forged() {
  const e = encrypt(plain());
  e.tag[randomInt(16)] ^= 1 << randomInt(8);
  return v1(e);
}

const out = [];
const projects = [];
for (let i = 0; i < nProjects; i++) {
  const p = { project: randomUUID(), owner: randomUUID(), name: `project ${i}` };
  projects.push(p);
  out.push(JSON.stringify(p));
}
const kinds = [];
for (let i = 0; i < rows; i++) kinds.push(i < nV1 ? 'v1' : i < nV1 + nLook ? 'lookalike' : i < nV1 + nLook + nForged ? 'forged' : 'plain');
for (let i = kinds.length - 1; i > 0; i--) {
  const j = randomInt(i + 1);
  [kinds[i], kinds[j]] = [kinds[j], kinds[i]];
}
for (let i = 0; i < rows; i++) {
  const p = projects[i % nProjects];
  const k = kinds[i];
  let pt, stored;
  switch (k) {
    case 'v1': pt = plain(); stored = Buffer.from(v1(encrypt(pt)), 'utf8'); break;
    case 'lookalike': pt = Buffer.from(lookalikes[i % lookalikes.length](), 'utf8'); stored = pt; break;
    case 'forged': pt = Buffer.from(forged(), 'utf8'); stored = pt; break;
    default: pt = plain(); stored = pt;
  }
  out.push(JSON.stringify({ project: p.project, key: `secret_${Math.floor(i / nProjects)}`, stored: b64(stored), plaintext: b64(pt), kind: k }));
}
process.stdout.write(out.join('\n') + '\n');
