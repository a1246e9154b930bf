// Package local is a keybroker KEK provider whose key-encryption keys live in
// the process: loaded from a keyring file or an environment variable, or
// generated. It wraps DEKs with AES-256-GCM from the standard library.
// Importing it registers the URL scheme "local" with provider.Register.
package local
