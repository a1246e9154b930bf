// Package health reports whether keybroker can do its work: per configured
// KEK provider, whether the key service answers and its current primary key
// version; with a pgstore.Store, whether the database answers and how many
// data keys and secrets still sit on a key version other than the primary
// (what `keybroker rewrap` would move). Checker.ServeHTTP serves it as a
// readiness probe.
//
// # Cheap and bounded
//
// A provider that is a provider.Describer is asked with Describe (one
// metadata call); any other with a Wrap of a random throwaway key, which is
// cleared and dropped. The database check is pgstore's Status (counts,
// no decryption). Counts need a role row-level security does not restrict;
// under one that it binds (a tenant-facing service's) the database is still
// checked, the counts are left out of the report and
// StoreReport.CountsOmitted says so: never zeros for rows it cannot see. A report is reused for Config.TTL, and concurrent checks
// share one refresh, so a probe hammering the endpoint causes at most one
// round of calls per TTL. A refresh runs under its own Config.Timeout,
// detached from the caller: a probe whose request times out gets 503 at
// once and the refresh still lands for the next probe. Nothing waits
// without a deadline. A rotation made elsewhere (another process, the
// key service's console) shows in the first report refreshed after the
// provider sees it, so within TTL plus Timeout for every backend; see
// docs/OPERATIONS.md for when each provider sees it.
//
// # Degraded is not down
//
// When a key service is unreachable the process keeps working from memory:
// the Envelope's active DEK keeps sealing until its message budget or age
// runs out, and cached DEKs keep opening until the cache TTL drops them.
// The report says Degraded (HTTP 200, so the instance stays in rotation)
// and keeps the last known primary version. Down (HTTP 503) means the
// database does not answer or the primary key service refuses outright
// (access denied, key not found, disabled), which waiting will not fix.
//
// # What the report shows
//
// Backend schemes, key versions, outcome classes and counts. Not key ids
// (they name accounts and tenants), error messages (native messages may
// echo requests), or anything about secrets; ProviderReport.Ref is there
// for the application and is left out of the JSON.
package health
