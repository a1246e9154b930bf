package main

// The key services keybroker can use; each registers its URL scheme.
import (
	_ "github.com/profullstack/keybroker/provider/awskms"
	_ "github.com/profullstack/keybroker/provider/gcpkms"
	_ "github.com/profullstack/keybroker/provider/local"
	_ "github.com/profullstack/keybroker/provider/vault"
)
