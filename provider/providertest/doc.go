// Package providertest is the conformance suite every keybroker backend
// passes. A backend's test builds a [Harness] for its real (or faithful)
// key service and calls [Run]; the suite checks round trips, binding of
// associated data, tamper detection, key separation, context handling,
// rotation and concurrent use, and that errors map to the portable kinds.
package providertest
