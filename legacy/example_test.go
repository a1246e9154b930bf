package legacy_test

import (
	"fmt"
	"log"
	"os"

	"github.com/profullstack/keybroker/legacy"
)

// A reader during MeshHook's migration: v1 ciphertexts under
// SECRETS_ENCRYPTION_KEY first, anything else is a legacy plaintext. A
// well-formed v1 value that does not decrypt is an error, never plaintext.
func Example() {
	// In MeshHook the variable is already set; the golden key stands in here.
	os.Setenv("SECRETS_ENCRYPTION_KEY", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")

	v1, err := legacy.Open("meshhook-v1://env/SECRETS_ENCRYPTION_KEY")
	if err != nil {
		log.Fatal(err)
	}
	chain, err := legacy.NewChain(v1, legacy.Plaintext())
	if err != nil {
		log.Fatal(err)
	}
	defer chain.Close()

	for _, stored := range []string{
		"v1:ZgwOzHsLu17ppshE:JWJAaYQC94RkPYEx7LYypg==:EBWrMQf+bjLVLa/KtKD/jz0lFA==", // from testdata
		"v1:not:a:ciphertext", // a plaintext that only looks like one
		"v1:ZgwOzHsLu17ppshE:JWJAaYQC94RkPYEx7LYypg==:EBWrMQf+bjLVLa/KtKD/jz1lFA==", // one ciphertext bit changed
	} {
		pt, ok, err := chain.Decode([]byte(stored))
		fmt.Printf("%q %v %v\n", pt, ok, err)
	}
	// Output:
	// "sk_live_51H8example" true <nil>
	// "v1:not:a:ciphertext" true <nil>
	// "" false legacy: value did not decrypt: envelope: message authentication failed
}
