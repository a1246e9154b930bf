// Runs against a real `keybroker serve` on a real PostgreSQL: the Go test
// clients/node/node_test.go starts both and sets the environment.
import { test } from 'node:test';
import assert from 'node:assert/strict';
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
