// Package server is keybroker's HTTP API, run by `keybroker serve`: a
// project's secrets (put, get, get-many, delete, list) for services in any
// language (clients/node is MeshHook's), authenticated by service tokens,
// with every access recorded in the database. The CLI only wires it:
//
//	srv, err := server.New(server.Config{Store: store, Pool: pool, Ready: checker})
//	ln, err := server.Listen(server.Options{Addr: ":8443", CertFile: crt, KeyFile: key})
//	err = server.Serve(ctx, ln, srv, opts) // until ctx is done, then a graceful shutdown
//
// # Routes
//
// JSON bodies, values as standard base64, paths under /v1 (project and
// name percent-encoded, one path segment each):
//
//	PUT    /v1/projects/{project}/secrets/{name}  {"value": b64}      → 204   write
//	GET    /v1/projects/{project}/secrets/{name}                      → 200 {"value": b64}, 404   read
//	DELETE /v1/projects/{project}/secrets/{name}                      → 204, 404   write
//	GET    /v1/projects/{project}/secrets                             → 200 {"secrets": [{name, created_at, updated_at}]}   read
//	POST   /v1/projects/{project}/get-many        {"names": [...]}    → 200 {"values": {name: b64}}   read
//	DELETE /v1/projects/{project}                                     → 200 {"data_keys": n, "secrets": n}   admin
//	POST   /v1/projects/{project}/seal       {table, column, row, "value": b64}   → 200 {"sealed": b64}   seal
//	POST   /v1/projects/{project}/open       {table, column, row, "sealed": b64}  → 200 {"value": b64}   open
//	POST   /v1/projects/{project}/open-many  {"items": [{table, column, row, sealed}]} → 200 {"values": [b64]}   open
//	GET    /livez, /readyz (package health), /metrics, /v1/openapi.json   no token
//
// The OpenAPI 3 document (openapi.json, embedded; OpenAPI returns it) lists
// exactly these routes, which a test checks both ways. Errors are
// {"error": code, "message": text}: the code from a fixed set, the text a
// fixed sentence or pgstore's bound that was broken, never a value, a
// token or a key. Bodies are bounded (Config.MaxBody, 2 MiB by default:
// 413 beyond), must be one JSON object with no unknown fields (400
// otherwise), and are decoded before any database work.
//
// # Tokens
//
// A service token is "kbt_" and the unpadded base64url of a 16-byte id and
// a 32-byte (256-bit) secret from crypto/rand. Tokens.Create returns it
// once; the table service_tokens (pgstore migration 9) keeps the id, the
// SHA-256 of the secret (a hash of a 256-bit random value needs no salt or
// stretching), its name, its projects (a list, or NULL for all), its
// operations (read: get, get-many, list; write: put, delete; seal, open:
// the encrypted-column routes; admin: deleting a project), its
// expiry and its revocation time. `keybroker token create|list|revoke`
// manages them with only the database (no KEK).
//
// A request's token is looked up by id and its secret's hash compared in
// constant time (crypto/subtle); an unknown id is compared against a fixed
// dummy hash, so it costs the same. Missing, malformed, unknown, wrong,
// revoked and expired tokens all get the same 401 and body.
//
// # Tokens bound to a client certificate
//
// A token may be bound to one client certificate (TokenSpec.ClientCertSHA256,
// `keybroker token create --client-cert FILE`; ClientCertFingerprint reads
// the PEM file): service_tokens.client_cert_sha256 (pgstore migration 11)
// keeps the SHA-256 of the certificate's DER. Such a token is accepted only
// on a TLS connection whose verified leaf certificate
// (tls.ConnectionState.VerifiedChains[0][0], so only with
// Options.ClientCAFile) hashes to it, compared in constant time. On any
// other connection (another certificate the CA signed, TLS without mTLS,
// plain HTTP or a TLS-terminating proxy in front) it gets the 401 and body
// of a bad token. The connection's certificate is hashed whenever it has
// one and compared for every token, bound, unbound or unknown, so the
// cost does not tell a bound token from another. Unbound tokens (NULL, all
// tokens made before migration 11) work with any certificate the CA
// signed, as before: mTLS alone admits a client, the token alone names it.
// Tokens.List shows a bound token's fingerprint as its first
// ClientCertPrefixLen hex digits.
//
// The identity an access_log row records is the token id, never the
// certificate: for a bound token that id stands for exactly one
// certificate (join service_tokens on token_id for its fingerprint); for
// an unbound token the row says nothing about which certificate, if any,
// the client presented. A token's row
// is reused for Config.TokenRecheck (1 s by default) before it is read
// again, so a revocation bites on every server within that; only rows that
// exist are kept, so the cache is bounded by the table. Each token has its
// own rate limiter (golang.org/x/time/rate, Config.Rate and Burst; 429 with
// Retry-After beyond).
//
// # Scope and existence
//
// Seal and open are for values the application stores in its own tables
// (MeshHook's secrets row, inserted in its own transaction): pgcolumn's
// SealContext and OpenContext, bound to the project and the table, column
// and row key the caller names, under that column's data keys. The server
// does not see where the bytes go, so nothing fences them (pgcolumn's
// declared columns, used in process, do). open-many opens up to
// MaxOpenMany values, all or nothing; a value that does not open for the
// context given is 400 decrypt_failed, one answer for every cause.
//
// After a project is deleted its writes get 409 (project_deleted) until
// `keybroker project reopen`.
//
// The scope check (operation and project) runs before anything is read: a
// request outside the token's scope gets 403 with one fixed body, whatever
// the project holds, so a 403 says nothing about whether a secret exists.
// Within its scope a token can list the project, so 404 for a missing
// secret tells it nothing it could not learn anyway.
//
// # Access log
//
// Every authenticated request about a project is a row of access_log:
// token id, project, the names asked for, the operation, the outcome (ok,
// not_found, forbidden, invalid, error) and the time. Each row commits
// before the response it records is written:
//
//   - Reads (get, get-many, list), seals, opens, refusals and a failed
//     write's outcome are group-committed: the request queues its row and
//     waits; one of two flusher goroutines takes every row queued (at most
//     512, and at most 8192 names unless a single row has more) and inserts
//     them with one autocommitted statement (INSERT ... SELECT FROM
//     unnest of one array per column; every row's names are a slice of
//     one flat text[]), then answers each waiter. There is no timer: a
//     flusher that finds rows flushes at once, and rows that arrive while
//     statements are in flight queue for the next one. A row that finds
//     no statement in flight and none queued is written by its own
//     request with the single-row INSERT ... VALUES, so a lone request
//     costs one statement, as before, and 64 concurrent ones share a few
//     (at most three statements are in flight). Rows of one statement
//     share its time (at is the statement's start). Only after its row
//     has committed does a request answer; if the statement fails every
//     request in it gets 503 and no value. When it fails for a row's own
//     data (SQLSTATE class 22 or 23: a name with NUL, a constraint) each
//     row is retried alone, so one request's row cannot refuse the others.
//   - A request whose context ends (Config.OpTimeout) while its row waits
//     gets 503 and no value; the row may still commit afterwards. A row
//     for an answer never sent is possible; an answer without its
//     committed row is not.
//   - Writes (put, delete) run in one transaction with their row
//     (pgstore's Store.In on a transaction that first inserts the row): the
//     write and its row commit together or not at all, so a server killed
//     at any point leaves neither a write without its row nor a row for a
//     write that did not happen. A failed write is rolled back and its
//     outcome recorded in a row of its own (group-committed, as above).
//   - Deleting a project (pgstore's ShredProject, a transaction of its
//     own with its project.shred event in key_events) gets a row with
//     outcome started committed before it and the outcome's row after it.
//   - Refusals of a valid token (403) are recorded; bad tokens (401) and
//     rate-limited requests (429) are not (that would let anyone fill the
//     table) and are counted in the metrics instead.
//
// Server.Close refuses new rows (503), lets the queued ones commit and
// answer their requests, and stops the flushers: call it after Serve
// returns (every in-flight request answered) and before the pool closes,
// as `keybroker serve` does. A server killed with rows queued loses only
// rows whose requests were never answered (a test SIGKILLs a serving
// process under 32 clients and finds every answered request's row).
//
// The store and log work of a request runs detached from the client's
// connection, under Config.OpTimeout: a client that hangs up mid-write does
// not cut the write short.
//
// # Hardened defaults
//
// Listen refuses plain HTTP on an address that is not loopback unless
// Options.AllowPlaintext (ErrPlaintext); with CertFile and KeyFile it
// serves TLS 1.2+, and ClientCAFile adds mTLS (client certificates
// required and verified, on top of the token; a handshake without one is
// refused before any token is read), which bound tokens need. Serve sets header, read,
// write and idle timeouts and a header size bound, so slow clients cannot
// hold connections, and on ctx's end stops accepting, lets in-flight
// requests finish (Options.ShutdownTimeout) and returns.
//
// # Metrics and logs
//
// keybroker.http.requests (by http.route, the route pattern, and
// http.response.status_code) and keybroker.http.duration (by route) go to
// Config.MeterProvider; the CLI exports them, with package telemetry's
// store and cache metrics, through OpenTelemetry's Prometheus exporter on
// /metrics. Neither carries a project, name, value or token. The log has
// one line per request (method, route pattern, status, token id,
// duration), never a path, header, value or token.
package server
