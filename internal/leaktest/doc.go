// Package leaktest holds one test, and no code: it runs every keybroker
// operation — successes and failures (wrong key, wrong aad, corrupt and
// truncated ciphertexts, a corrupt database row, bad provider URLs and
// keyrings, unreachable key services, a closed database) — with a sentinel
// plaintext, sentinel key bytes and sentinel credentials, and asserts that
// none of them, in raw, hex, base64 or Go-formatted form, appears in any
// log record (an slog handler capturing everything at debug level, also
// installed as the default logger), error string (%v and %+v), metric
// attribute, span name, attribute, event or status, or panic message.
package leaktest
