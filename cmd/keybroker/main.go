// Command keybroker is the operator's tool for keybroker: it applies the
// schema, stores and reads secrets, rotates key-encryption keys, rewraps and
// re-encrypts data keys, imports plaintext columns, verifies every secret and
// reports key status. `keybroker help` documents configuration and exit codes.
package main

import "os"

func main() { os.Exit(run(os.Args[1:])) }
