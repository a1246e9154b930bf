# toolchain.sh is sourced by the scripts: it pins the Go toolchain they build, vet and test
# with. go.mod says go 1.26.8, whose standard library has vulnerabilities that govulncheck
# reports as called (fixed in go1.26.9 and go1.26.10); the go command downloads this patched
# toolchain from the module proxy. Set KEYBROKER_GOTOOLCHAIN=local to use the installed Go.
KEYBROKER_GOTOOLCHAIN="${KEYBROKER_GOTOOLCHAIN:-go1.26.11}"
export GOTOOLCHAIN="$KEYBROKER_GOTOOLCHAIN"
