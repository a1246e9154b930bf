// Runs against a real `keybroker serve` on a real PostgreSQL: the Go test
// clients/node/node_test.go starts both and sets the environment.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { KeybrokerClient, KeybrokerError } from '../keybroker.js';

const url = process.env.KEYBROKER_URL;
const rw = process.env.KEYBROKER_TOKEN_RW; // read, write on projects p1 and p2
const ro = process.env.KEYBROKER_TOKEN_RO; // read on p1
const revoked = process.env.KEYBROKER_TOKEN_REVOKED;
const admin = process.env.KEYBROKER_TOKEN_ADMIN; // admin on p3
const marker = process.env.KEYBROKER_VALUE_MARKER; // every value starts with it; the Go test greps the logs for it
if (!url || !rw || !ro || !revoked || !admin || !marker) throw new Error('run through go test ./clients/node/ (KEYBROKER_URL and tokens unset)');

const kb = new KeybrokerClient({ url, token: rw });

// MeshHook's POST /api/secrets (store a user's workflow secret) and GET
// /api/secrets (list them; read one back for the editor).
test('MeshHook /api/secrets flow', async () => {
  const value = `${marker}-whsec-${'x'.repeat(40)}`;
  await kb.put('p1', 'stripe/webhook secret', value);
  assert.equal(await kb.getString('p1', 'stripe/webhook secret'), value);
  await kb.put('p1', 'stripe/webhook secret', value + '-2'); // replace
  assert.equal(await kb.getString('p1', 'stripe/webhook secret'), value + '-2');
  const names = (await kb.list('p1')).map((s) => s.name);
  assert.ok(names.includes('stripe/webhook secret'));
  const bytes = new Uint8Array([0, 255, 1, 254]);
  await kb.put('p1', 'binary', bytes);
  assert.deepEqual(await kb.get('p1', 'binary'), bytes);
  assert.equal(await kb.get('p1', 'never-set'), null);
  assert.equal(await kb.delete('p1', 'binary'), true);
  assert.equal(await kb.delete('p1', 'binary'), false);
  assert.equal(await kb.get('p1', 'binary'), null);
});

// A workflow run reads every secret it needs in one call.
test('workflow run reads its secrets with one get-many', async () => {
  const want = {};
  for (let i = 0; i < 10; i++) {
    want[`wf/secret-${i}`] = `${marker}-wf-${i}`;
    await kb.put('p2', `wf/secret-${i}`, want[`wf/secret-${i}`]);
  }
  const got = await kb.getManyStrings('p2', [...Object.keys(want), 'wf/not-set']);
  assert.deepEqual(got, want);
});

test('scope: a read-only token cannot write, and another project is 403 whether or not the secret exists', async () => {
  await kb.put('p2', 'exists', `${marker}-p2`);
  const reader = new KeybrokerClient({ url, token: ro });
  await assert.rejects(reader.put('p1', 'x', 'y'), (e) => e instanceof KeybrokerError && e.status === 403 && e.code === 'forbidden');
  const a = await reader.get('p2', 'exists').catch((e) => e);
  const b = await reader.get('p2', 'missing').catch((e) => e);
  assert.equal(a.status, 403);
  assert.equal(b.status, 403);
  assert.equal(a.message, b.message);
  assert.ok(!a.message.includes(ro), 'error carries the token');
});

test('bad and revoked tokens get the same 401', async () => {
  const bad = new KeybrokerClient({ url, token: 'kbt_' + 'A'.repeat(64) });
  const gone = new KeybrokerClient({ url, token: revoked });
  const e1 = await bad.get('p1', 'x').catch((e) => e);
  const e2 = await gone.get('p1', 'x').catch((e) => e);
  assert.equal(e1.status, 401);
  assert.equal(e2.status, 401);
  assert.equal(e1.message, e2.message);
});

test('bad input is refused before any request', async () => {
  await assert.rejects(kb.put('', 'n', 'v'), TypeError);
  await assert.rejects(kb.put('p1', 'n', 42), TypeError);
  assert.throws(() => new KeybrokerClient({ url, token: 'not-a-token' }), TypeError);
});

test('deleting a project shreds its secrets; later writes get 409', async () => {
  const p3 = new KeybrokerClient({ url, token: rw });
  await p3.put('p3', 'a', `${marker}-p3a`);
  await p3.put('p3', 'b', `${marker}-p3b`);
  await assert.rejects(p3.deleteProject('p3'), (e) => e.status === 403);
  const res = await new KeybrokerClient({ url, token: admin }).deleteProject('p3');
  assert.deepEqual(res, { dataKeys: 1, secrets: 2 });
  assert.equal(await p3.get('p3', 'a'), null);
  await assert.rejects(p3.put('p3', 'a', 'again'), (e) => e.status === 409 && e.code === 'project_deleted');
});

// MeshHook seals a value, then inserts the bytes into its own secrets row in
// its own transaction; a workflow run opens its rows in one call.
test('seal for an encrypted column, open, open-many', async () => {
  const where = (name) => ({ table: 'public.secrets', column: 'value_encrypted', row: [name] });
  const sealed = await kb.seal('p1', where('stripe'), `${marker}-column`);
  assert.ok(sealed instanceof Uint8Array && sealed.length > 56);
  assert.ok(!Buffer.from(sealed).includes(Buffer.from(marker)), 'sealed bytes hold the plaintext');
  assert.equal(new TextDecoder().decode(await kb.open('p1', where('stripe'), sealed)), `${marker}-column`);
  const other = await kb.seal('p1', where('github'), `${marker}-column-2`);
  const both = await kb.openMany('p1', [{ ...where('stripe'), sealed }, { ...where('github'), sealed: other }]);
  assert.deepEqual(both.map((v) => new TextDecoder().decode(v)), [`${marker}-column`, `${marker}-column-2`]);
  // Moved to another row, it does not open.
  await assert.rejects(kb.open('p1', where('github'), sealed), (e) => e.status === 400 && e.code === 'decrypt_failed');
});

// MeshHook's POST /api/secrets with encrypted columns: seal the value with
// keybroker, then insert the sealed bytes into MeshHook's own secrets row
// (its real schema, internal/meshhook) in MeshHook's own transaction. There
// is no Node PostgreSQL driver here (no npm registry), so psql plays
// MeshHook's driver; its variables (-v, :'name') quote every value.
const psqlBin = process.env.KEYBROKER_PSQL;
const mhDB = process.env.MESHHOOK_DATABASE_URL;
const mhSchema = process.env.MESHHOOK_SCHEMA;
const mhProject = process.env.MESHHOOK_PROJECT_ID; // a MeshHook projects.id, also the keybroker project
if (!psqlBin || !mhDB || !mhSchema || !mhProject) throw new Error('run through go test ./clients/node/ (psql and MeshHook database unset)');

// psql runs script (from stdin, so :'var' interpolation applies) with vars
// and returns its unaligned, tuples-only output; any SQL error fails it.
function psql(script, vars) {
  const args = ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', mhDB, '-v', `schema=${mhSchema}`];
  for (const [k, v] of Object.entries(vars)) args.push('-v', `${k}=${v}`);
  const r = spawnSync(psqlBin, args, { input: script, encoding: 'utf8', timeout: 30_000 });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`psql exited ${r.status}: ${r.stderr.trim()}`);
  return r.stdout.trim();
}

// MeshHook's upsert of a secrets row (internal/meshhook's writer runs the same).
const upsert = `
SET search_path = :"schema";
INSERT INTO projects (id, owner, name) VALUES (:'project', :'owner', 'node-test') ON CONFLICT (id) DO NOTHING;
INSERT INTO secrets (project_id, key, value_encrypted) VALUES (:'project', :'key', decode(:'sealed', 'hex'))
ON CONFLICT (project_id, key) DO UPDATE SET value_encrypted = EXCLUDED.value_encrypted, updated_at = now();
SELECT count(*) FROM secrets WHERE project_id = :'project' AND key = :'key';`;
const readRow = `SET search_path = :"schema";
SELECT encode(value_encrypted, 'hex') FROM secrets WHERE project_id = :'project' AND key = :'key';`;
// The seal context names MeshHook's row by its unique key (project_id, key).
const mhRow = (key) => ({ table: `${mhSchema}.secrets`, column: 'value_encrypted', row: [mhProject, key] });

test("MeshHook inserts a sealed value into its own secrets row in its own transaction; ROLLBACK leaves no row", async () => {
  const owner = randomUUID();
  const value = `${marker}-mh-${'y'.repeat(32)}`;
  const sealed = await kb.seal(mhProject, mhRow('stripe/webhook'), value);
  const hex = Buffer.from(sealed).toString('hex');
  assert.equal(psql(`BEGIN;${upsert}\nCOMMIT;`, { project: mhProject, owner, key: 'stripe/webhook', sealed: hex }), '1');

  // A workflow run reads MeshHook's row (its own query) and opens it.
  const stored = psql(readRow, { project: mhProject, key: 'stripe/webhook' });
  assert.equal(stored, hex, 'the row holds the sealed bytes unchanged');
  assert.ok(!Buffer.from(stored, 'hex').includes(Buffer.from(marker)), 'the row holds the plaintext');
  const opened = await kb.open(mhProject, mhRow('stripe/webhook'), new Uint8Array(Buffer.from(stored, 'hex')));
  assert.equal(new TextDecoder().decode(opened), value);
  // The bytes are bound to their row: under another key they do not open.
  await assert.rejects(kb.open(mhProject, mhRow('github/token'), new Uint8Array(Buffer.from(stored, 'hex'))),
    (e) => e.status === 400 && e.code === 'decrypt_failed');

  // MeshHook's transaction fails after sealing (its route throws): the
  // row was inserted inside the transaction (count 1 there) and is gone
  // after ROLLBACK. The sealed value is simply never stored; keybroker
  // holds nothing to undo.
  const lost = await kb.seal(mhProject, mhRow('github/token'), `${marker}-mh-rolled-back`);
  assert.equal(psql(`BEGIN;${upsert}\nROLLBACK;`, { project: mhProject, owner, key: 'github/token', sealed: Buffer.from(lost).toString('hex') }), '1');
  assert.equal(psql(readRow, { project: mhProject, key: 'github/token' }), '', 'a rolled-back row is visible');
  assert.equal(psql(`SET search_path = :"schema"; SELECT count(*) FROM secrets WHERE project_id = :'project';`, { project: mhProject }), '1');
});
