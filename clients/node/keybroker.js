// keybroker.js: a client for `keybroker serve` (ES module, fetch, no
// dependencies). Values are bytes: put takes a string (sent as UTF-8) or a
// Uint8Array; get returns a Uint8Array, getString a string. Errors are
// KeybrokerError with the HTTP status and the server's error code; no error
// carries the token or a value.

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** An error answered by the server (or the network). */
export class KeybrokerError extends Error {
  constructor(status, code, message) {
    super(`keybroker: ${status ? status + ' ' : ''}${code}: ${message}`);
    this.name = 'KeybrokerError';
    /** HTTP status; 0 when no answer came. */
    this.status = status;
    /** The server's error code: unauthorized, forbidden, not_found, invalid_request, too_large, rate_limited, unavailable, ... */
    this.code = code;
  }
}

function toBytes(value) {
  if (typeof value === 'string') return encoder.encode(value);
  if (value instanceof Uint8Array) return value;
  throw new TypeError('keybroker: value must be a string or a Uint8Array');
}

function b64encode(bytes) {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

function b64decode(s) {
  return new Uint8Array(Buffer.from(s, 'base64'));
}

function seg(s, what) {
  if (typeof s !== 'string' || s === '') throw new TypeError(`keybroker: ${what} must be a non-empty string`);
  return encodeURIComponent(s);
}

export class KeybrokerClient {
  /**
   * @param {object} opts
   * @param {string} opts.url   the server's base URL, e.g. https://keybroker.internal:8200
   * @param {string} opts.token a service token (kbt_...)
   * @param {number} [opts.timeoutMs=10000] per request
   * @param {typeof fetch} [opts.fetch] a fetch implementation (default: the global one)
   */
  constructor({ url, token, timeoutMs = 10000, fetch: f = globalThis.fetch } = {}) {
    if (!url) throw new TypeError('keybroker: url is required');
    if (typeof token !== 'string' || !token.startsWith('kbt_')) throw new TypeError('keybroker: token must be a kbt_ service token');
    this.#base = url.replace(/\/+$/, '');
    this.#token = token;
    this.#timeoutMs = timeoutMs;
    this.#fetch = f;
  }

  #base;
  #token;
  #timeoutMs;
  #fetch;

  async #request(method, path, body, okStatuses = [200]) {
    let res;
    try {
      res = await this.#fetch(this.#base + path, {
        method,
        headers: {
          authorization: `Bearer ${this.#token}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.#timeoutMs),
      });
    } catch (err) {
      // Not err.message: it could name the URL; the cause stays reachable.
      const e = new KeybrokerError(0, 'unreachable', `${method} request failed (${err?.name ?? 'error'})`);
      e.cause = err;
      throw e;
    }
    if (okStatuses.includes(res.status)) {
      if (res.status === 204) return null;
      if (res.status === 404) {
        await res.arrayBuffer(); // drain, so the connection is reused
        return { status: 404, json: null };
      }
      return { status: res.status, json: await res.json() };
    }
    let code = 'error';
    let message = res.statusText;
    try {
      const j = await res.json();
      code = j.error ?? code;
      message = j.message ?? message;
    } catch {
      // not JSON: keep the status text
    }
    throw new KeybrokerError(res.status, code, message);
  }

  #secretPath(project, name) {
    return `/v1/projects/${seg(project, 'project')}/secrets/${seg(name, 'name')}`;
  }

  /** Stores (creates or replaces) a secret. Resolves once it is committed. */
  async put(project, name, value) {
    await this.#request('PUT', this.#secretPath(project, name), { value: b64encode(toBytes(value)) }, [204]);
  }

  /** Returns the secret's bytes, or null when it is not set. */
  async get(project, name) {
    const r = await this.#request('GET', this.#secretPath(project, name), undefined, [200, 404]);
    if (r.status === 404) return null;
    return b64decode(r.json.value);
  }

  /** get, decoded as UTF-8. */
  async getString(project, name) {
    const v = await this.get(project, name);
    return v === null ? null : decoder.decode(v);
  }

  /**
   * Reads up to 1000 secrets of a project in one call. Returns a Map from
   * each name that is set to its bytes; names not set are absent.
   */
  async getMany(project, names) {
    if (!Array.isArray(names)) throw new TypeError('keybroker: names must be an array');
    const r = await this.#request('POST', `/v1/projects/${seg(project, 'project')}/get-many`, { names });
    return new Map(Object.entries(r.json.values).map(([k, v]) => [k, b64decode(v)]));
  }

  /** getMany, decoded as UTF-8, as a plain object. */
  async getManyStrings(project, names) {
    const out = {};
    for (const [k, v] of await this.getMany(project, names)) out[k] = decoder.decode(v);
    return out;
  }

  /** Deletes a secret; false when it was not set. */
  async delete(project, name) {
    const r = await this.#request('DELETE', this.#secretPath(project, name), undefined, [204, 404]);
    return r === null;
  }

  /**
   * Seals a value the application stores in its own table (an encrypted
   * column), bound to the project, table, column and row key: returns the
   * bytes (Uint8Array) to put in the bytea column. Needs the seal operation.
   */
  async seal(project, { table, column, row }, value) {
    const r = await this.#request('POST', `/v1/projects/${seg(project, 'project')}/seal`, { table, column, row, value: b64encode(toBytes(value)) });
    return b64decode(r.json.sealed);
  }

  /** Opens what seal sealed, for the same project, table, column and row. Needs the open operation. */
  async open(project, { table, column, row }, sealed) {
    const r = await this.#request('POST', `/v1/projects/${seg(project, 'project')}/open`, { table, column, row, sealed: b64encode(toBytes(sealed)) });
    return b64decode(r.json.value);
  }

  /** Opens up to 1000 sealed values in one call, all or nothing: items are [{ table, column, row, sealed }]. */
  async openMany(project, items) {
    const body = { items: items.map(({ table, column, row, sealed }) => ({ table, column, row, sealed: b64encode(toBytes(sealed)) })) };
    const r = await this.#request('POST', `/v1/projects/${seg(project, 'project')}/open-many`, body);
    return r.json.values.map(b64decode);
  }

  /**
   * Deletes (crypto-shreds) a whole project: every secret and data key of it.
   * Needs a token with the admin operation. Resolves to { dataKeys, secrets }
   * destroyed. Later puts fail with status 409 (project_deleted).
   */
  async deleteProject(project) {
    const r = await this.#request('DELETE', `/v1/projects/${seg(project, 'project')}`);
    return { dataKeys: r.json.data_keys, secrets: r.json.secrets };
  }

  /** Lists a project's secrets: [{ name, createdAt, updatedAt }] sorted by name, no values. */
  async list(project) {
    const r = await this.#request('GET', `/v1/projects/${seg(project, 'project')}/secrets`);
    return r.json.secrets.map((s) => ({ name: s.name, createdAt: new Date(s.created_at), updatedAt: new Date(s.updated_at) }));
  }
}
