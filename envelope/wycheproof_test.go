package envelope

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// wycheproofFile finds shared/testdata/wycheproof/aes_gcm_test.json, which
// CI places beside the clone, by walking up from the working directory.
func wycheproofFile(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		p := filepath.Join(dir, "shared", "testdata", "wycheproof", "aes_gcm_test.json")
		if _, err := os.Stat(p); err == nil {
			return p
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("Wycheproof vectors not found: no shared/testdata/wycheproof/aes_gcm_test.json in any parent of the working directory (CI checks out shared/ beside the repository)")
		}
		dir = parent
	}
}

type wycheproofFileJSON struct {
	TestGroups []struct {
		KeySize, IvSize, TagSize int
		Tests                    []struct {
			TcID                       int `json:"tcId"`
			Comment                    string
			Key, Iv, Aad, Msg, Ct, Tag string
			Result                     string
		}
	}
}

// TestWycheproof runs every AES-GCM vector with a 256-bit key, 96-bit nonce
// and 128-bit tag through newAEAD, sealGCM and openGCM, the construction
// envelopes use.
func TestWycheproof(t *testing.T) {
	data, err := os.ReadFile(wycheproofFile(t))
	if err != nil {
		t.Fatal(err)
	}
	var f wycheproofFileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("Wycheproof file: %v", err)
	}
	unhex := func(tc int, s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatalf("tc %d: %v", tc, err)
		}
		return b
	}
	valid, invalid := 0, 0
	for _, g := range f.TestGroups {
		if g.KeySize != 256 || g.IvSize != 96 || g.TagSize != 128 {
			continue
		}
		for _, tc := range g.Tests {
			key, nonce, aad := unhex(tc.TcID, tc.Key), unhex(tc.TcID, tc.Iv), unhex(tc.TcID, tc.Aad)
			msg, ct := unhex(tc.TcID, tc.Msg), append(unhex(tc.TcID, tc.Ct), unhex(tc.TcID, tc.Tag)...)
			a, err := newAEAD(key)
			if err != nil {
				t.Fatalf("tc %d: newAEAD: %v", tc.TcID, err)
			}
			pt, openErr := openGCM(a, nil, nonce, ct, aad)
			switch tc.Result {
			case "valid":
				valid++
				if got := sealGCM(a, nil, nonce, msg, aad); !bytes.Equal(got, ct) {
					t.Errorf("tc %d (%s): seal differs from the vector", tc.TcID, tc.Comment)
				}
				if openErr != nil || !bytes.Equal(pt, msg) {
					t.Errorf("tc %d (%s): open: %v", tc.TcID, tc.Comment, openErr)
				}
			case "invalid":
				invalid++
				if openErr != ErrDecrypt || pt != nil {
					t.Errorf("tc %d (%s): invalid vector opened (err %v)", tc.TcID, tc.Comment, openErr)
				}
			default:
				t.Fatalf("tc %d: unexpected result %q", tc.TcID, tc.Result)
			}
		}
	}
	if valid == 0 || invalid == 0 {
		t.Fatalf("ran %d valid and %d invalid vectors; want both > 0", valid, invalid)
	}
	t.Logf("Wycheproof AES-256-GCM, 96-bit nonce: %d valid and %d invalid vectors", valid, invalid)
}
