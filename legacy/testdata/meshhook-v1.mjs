// MeshHook v1 reference encoder, run by legacy's tests with Node 20+:
//
//   SECRETS_ENCRYPTION_KEY=... node meshhook-v1.mjs < request.json
//
// request.json: {"plaintexts": ["<standard base64>", ...]}
// stdout:       {"key_hex": "<derived key>", "values": [{"plaintext": "<base64>", "stored": "v1:..."}, ...]}
//
// It derives the key and seals each plaintext as MeshHook does, with
// node:crypto only: AES-256-GCM, a fresh random 12-byte IV per value, no
// associated data, stored as v1:<iv>:<tag>:<ct> in standard base64. Every run
// gives new ciphertexts.
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';

function parseKey(s) {
  if (s === undefined || s === '') throw new Error('SECRETS_ENCRYPTION_KEY is not set');
  if (/^[0-9a-fA-F]{64}$/.test(s)) return Buffer.from(s, 'hex');
  if (/^[A-Za-z0-9+/]{43}=$/.test(s)) {
    const k = Buffer.from(s, 'base64');
    if (k.length === 32 && k.toString('base64') === s) return k;
  }
  if (s.length >= 32) return createHash('sha256').update(s, 'utf8').digest();
  throw new Error('SECRETS_ENCRYPTION_KEY: not hex, base64 of 32 bytes, or a passphrase of 32+ characters');
}

function encrypt(key, plaintext) {
  const iv = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', key, iv);
  const ct = Buffer.concat([c.update(plaintext), c.final()]);
  const tag = c.getAuthTag();
  return `v1:${iv.toString('base64')}:${tag.toString('base64')}:${ct.toString('base64')}`;
}

const key = parseKey(process.env.SECRETS_ENCRYPTION_KEY);
const req = JSON.parse(readFileSync(0, 'utf8'));
const values = req.plaintexts.map((p) => ({ plaintext: p, stored: encrypt(key, Buffer.from(p, 'base64')) }));
process.stdout.write(JSON.stringify({ key_hex: key.toString('hex'), values }, null, 1) + '\n');
