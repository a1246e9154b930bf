// Package server is keybroker's HTTP API, run by `keybroker serve`: a
// project's secrets (put, get, get-many, delete, list) for services in any
// language, authenticated by service tokens, with every access recorded.
package server
