package local_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// Two fixed keys so tests can look for them in error messages.
var (
	key1 = append([]byte{0xfb, 0xef, 0xbe, 0xff}, bytes.Repeat([]byte{0x5a, 0xc3, 0x17, 0x88}, 7)...) // "++++/" in base64
	key2 = bytes.Repeat([]byte{0x21, 0x9e, 0x4f, 0xd0}, 8)
	b641 = base64.StdEncoding.EncodeToString(key1)
	b642 = base64.StdEncoding.EncodeToString(key2)
)

const validKeyring = `{"id":"meshhook","primary":2,"keys":[
 {"version":1,"key":"` + "KEY1" + `","created":"2026-01-02T03:04:05Z","retired":false},
 {"version":2,"key":"` + "KEY2" + `"}]}`

func keyring(s string) string {
	return strings.NewReplacer("KEY1", b641, "KEY2", b642).Replace(s)
}

func writeFile(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask may have narrowed it
		t.Fatal(err)
	}
	return path
}

// checkErr asserts err is a one-line *provider.Error from this package that
// contains want and none of the secrets in any common encoding.
func checkErr(t *testing.T, err error, want string, secrets ...[]byte) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", want)
	}
	msg := err.Error()
	var pe *provider.Error
	if !errors.As(err, &pe) || pe.Provider != local.Scheme {
		t.Errorf("error %q is not a *provider.Error from %q", msg, local.Scheme)
	}
	if !strings.Contains(msg, want) {
		t.Errorf("error %q does not contain %q", msg, want)
	}
	if strings.ContainsAny(msg, "\r\n") {
		t.Errorf("error %q spans lines", msg)
	}
	for _, s := range append(secrets, key1, key2) {
		if len(s) == 0 {
			continue
		}
		b64 := base64.StdEncoding.EncodeToString(s)
		for _, enc := range []string{string(s), hex.EncodeToString(s), b64, b64[:12], base64.RawURLEncoding.EncodeToString(s)} {
			if strings.Contains(msg, enc) {
				t.Errorf("error %q contains key material", msg)
			}
		}
	}
}

func TestOpenFileValid(t *testing.T) {
	for _, mode := range []os.FileMode{0o600, 0o400} {
		p, err := local.OpenFile(writeFile(t, keyring(validKeyring), mode))
		if err != nil {
			t.Fatalf("mode %04o: %v", mode, err)
		}
		st, err := p.Describe(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.Ref != (provider.KeyRef{Provider: "local", KeyID: "meshhook"}) || st.PrimaryVersion != "2" || strings.Join(st.Versions, ",") != "1,2" {
			t.Fatalf("Describe = %+v", st)
		}
	}
}

func TestOpenFilePermissions(t *testing.T) {
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660, 0o601, 0o610, 0o700 | 0o070} {
		_, err := local.OpenFile(writeFile(t, keyring(validKeyring), mode))
		checkErr(t, err, "accessible by group or others")
		if err != nil && !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("mode %04o: error %q does not say how to fix it", mode, err)
		}
	}
}

func TestOpenFileMalformed(t *testing.T) {
	short := base64.StdEncoding.EncodeToString(key1[:31])
	long := base64.StdEncoding.EncodeToString(append(bytes.Clone(key1), 1))
	for _, c := range []struct{ name, doc, want string }{
		{"short key", `{"id":"a","primary":1,"keys":[{"version":1,"key":"` + short + `"}]}`, "version 1: key is 31 bytes, want 32"},
		{"long key", `{"id":"a","primary":1,"keys":[{"version":1,"key":"` + long + `"}]}`, "version 1: key is 33 bytes, want 32"},
		{"empty key", `{"id":"a","primary":1,"keys":[{"version":1,"key":""}]}`, "version 1: key is 0 bytes"},
		{"key not base64", `{"id":"a","primary":1,"keys":[{"version":1,"key":"` + b641[:20] + `!!` + b641[22:] + `"}]}`, "version 1: key is not valid standard base64"},
		{"key url base64", `{"id":"a","primary":1,"keys":[{"version":1,"key":"` + strings.NewReplacer("+", "-", "/", "_").Replace(b641) + `"}]}`, "not valid standard base64"},
		{"key a number", `{"id":"a","primary":1,"keys":[{"version":1,"key":12345}]}`, "version 1: key is not a base64 string"},
		{"no key", `{"id":"a","primary":1,"keys":[{"version":1}]}`, "version 1 has no key"},
		{"null key", `{"id":"a","primary":1,"keys":[{"version":1,"key":null}]}`, "version 1 has no key"},
		{"zero primaries", keyring(`{"id":"a","keys":[{"version":1,"key":"KEY1"}]}`), "names no primary version"},
		{"primary 0", keyring(`{"id":"a","primary":0,"keys":[{"version":1,"key":"KEY1"}]}`), "names no primary version"},
		{"two primaries", keyring(`{"id":"a","primary":1,"primary":2,"keys":[{"version":1,"key":"KEY1"},{"version":2,"key":"KEY2"}]}`), `duplicate field "primary"`},
		{"duplicate key field", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1","key":"KEY2"}]}`), `duplicate field "key"`},
		{"duplicate odd field", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1"}],"KEY2":1,"KEY2":1}`), "duplicate field (name not shown)"},
		{"primary missing", keyring(`{"id":"a","primary":3,"keys":[{"version":1,"key":"KEY1"}]}`), "primary version 3 is not in the keyring"},
		{"primary retired", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"retired":true},{"version":2,"key":"KEY2"}]}`), "primary version 1 is retired"},
		{"id in capitals beside id", keyring(`{"id":"a","ID":"b","primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), `duplicate field "id" (also spelled "ID"; field names are case-sensitive)`},
		{"id in capitals alone", keyring(`{"ID":"a","primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), `field "ID" must be spelled "id"`},
		{"key in capitals beside key", keyring(`{"id":"a","primary":2,"keys":[{"version":1,"key":"KEY1"},{"version":2,"key":"KEY1","KEY":"KEY2"}]}`), `duplicate field "key" (also spelled "KEY"`},
		{"primary in mixed case", keyring(`{"id":"a","Primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), `field "Primary" must be spelled "primary"`},
		{"key with a Kelvin sign", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"Key":"KEY1"}]}`), `field (name not shown) must be spelled "key"`},
		{"retired in capitals", keyring(`{"id":"a","primary":2,"keys":[{"version":1,"RETIRED":true},{"version":2,"key":"KEY2"}]}`), `field "RETIRED" must be spelled "retired"`},
		{"unknown top field", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1"}],"comment":"x"}`), `unknown field "comment"`},
		{"unknown key field", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1","kid":"x"}]}`), `unknown field "kid"`},
		{"unknown field named like a key", keyring(`{"id":"a","primary":1,"KEY2":1,"keys":[{"version":1,"key":"KEY1"}]}`), "unknown field (name not shown)"},
		{"duplicate version", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1"},{"version":1,"key":"KEY2"}]}`), "version 1 appears twice"},
		{"version 0", keyring(`{"id":"a","primary":1,"keys":[{"version":0,"key":"KEY1"}]}`), "versions start at 1"},
		{"version negative", keyring(`{"id":"a","primary":1,"keys":[{"version":-1,"key":"KEY1"}]}`), `field "keys.version" has the wrong type or is out of range`},
		{"version too big", keyring(`{"id":"a","primary":1,"keys":[{"version":4294967296,"key":"KEY1"}]}`), "out of range"},
		{"retired with key", keyring(`{"id":"a","primary":2,"keys":[{"version":1,"key":"KEY1","retired":true},{"version":2,"key":"KEY2"}]}`), "version 1 is retired but still has a key"},
		{"no keys", `{"id":"a","primary":1,"keys":[]}`, "keyring has no keys"},
		{"no id", keyring(`{"primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), "keyring id must be"},
		{"bad id", keyring(`{"id":"a b","primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), "keyring id must be"},
		{"id is a key", keyring(`{"id":"KEY1","primary":1,"keys":[{"version":1,"key":"KEY1"}]}`), "keyring id must be"},
		{"bad created", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1","created":"yesterday"}]}`), "created timestamp is not RFC 3339"},
		{"trailing data", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1"}]} {}`), "unexpected data after the keyring object"},
		{"array", `[1,2]`, "keyring must be a JSON object"},
		{"null", `null`, "keyring must be a JSON object"},
		{"empty", ``, "keyring is empty"},
		{"truncated", keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"KEY1"`), "malformed JSON"},
		{"deep nesting", `{"id":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`, "nested too deeply"},
		{"syntax error inside key", `{"id":"a","primary":1,"keys":[{"version":1,"key":"` + b641[:10] + "\x01" + b641[10:] + `"}]}`, "malformed JSON at byte"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := local.OpenFile(writeFile(t, c.doc, 0o600))
			checkErr(t, err, c.want, key1[:31])
			if err != nil && !strings.Contains(err.Error(), "provider: local: open: keyring file ") {
				t.Errorf("error %q does not name the keyring file", err)
			}
		})
	}
}

func TestOpenFileOversize(t *testing.T) {
	doc := keyring(validKeyring)
	doc = doc[:len(doc)-1] + strings.Repeat(" ", local.MaxKeyringSize) + "}"
	_, err := local.OpenFile(writeFile(t, doc, 0o600))
	checkErr(t, err, "limit 1048576")

	t.Setenv("KB_TEST_BIG", doc)
	_, err = local.FromEnv("KB_TEST_BIG")
	checkErr(t, err, "limit 1048576")
}

func TestOpenFileNotThere(t *testing.T) {
	_, err := local.OpenFile(filepath.Join(t.TempDir(), "missing.json"))
	checkErr(t, err, "missing.json")
	if !errors.Is(err, provider.ErrKeyNotFound) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v matches neither ErrKeyNotFound nor fs.ErrNotExist", err)
	}
	_, err = local.OpenFile(t.TempDir())
	checkErr(t, err, "not a regular file")
}

func TestFromEnv(t *testing.T) {
	ctx := context.Background()
	doc := keyring(validKeyring)
	file, err := local.OpenFile(writeFile(t, doc, 0o600))
	if err != nil {
		t.Fatal(err)
	}
	dek := bytes.Repeat([]byte{7}, 32)
	wk, err := file.Wrap(ctx, dek, []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.StdEncoding.EncodeToString([]byte(doc))
	var wrapped strings.Builder // as `base64` prints it: 76 columns
	for i := 0; i < len(b64); i += 76 {
		wrapped.WriteString(b64[i:min(i+76, len(b64))] + "\n")
	}
	for name, val := range map[string]string{"json": doc, "base64": b64, "wrapped base64": wrapped.String(), "padded json": "\n  " + doc + "\n"} {
		t.Run(name, func(t *testing.T) {
			t.Setenv("KB_TEST_KEYRING", val)
			p, err := local.FromEnv("KB_TEST_KEYRING")
			if err != nil {
				t.Fatal(err)
			}
			got, err := p.Unwrap(ctx, wk, []byte("aad"))
			if err != nil || !bytes.Equal(got, dek) {
				t.Fatalf("a key wrapped by the file keyring does not unwrap with the env keyring: %v", err)
			}
			_, err = p.Rotate(ctx)
			checkErr(t, err, "environment variable KB_TEST_KEYRING")
			if !errors.Is(err, local.ErrReadOnly) {
				t.Errorf("Rotate of an env keyring: %v, want ErrReadOnly", err)
			}
			if err := p.Retire(ctx, "1"); !errors.Is(err, local.ErrReadOnly) {
				t.Errorf("Retire of an env keyring: %v, want ErrReadOnly", err)
			}
		})
	}
}

func TestFromEnvErrors(t *testing.T) {
	_, err := local.FromEnv("KB_TEST_SURELY_UNSET")
	checkErr(t, err, "environment variable KB_TEST_SURELY_UNSET is not set")
	if !errors.Is(err, provider.ErrKeyNotFound) {
		t.Errorf("unset variable: %v, want ErrKeyNotFound", err)
	}
	_, err = local.FromEnv("1BAD-NAME")
	checkErr(t, err, "malformed environment variable name")

	for _, c := range []struct{ val, want string }{
		{"", "KB_TEST_VAL: empty"},
		{"   \n", "KB_TEST_VAL: empty"},
		{"not%base64", "neither keyring JSON nor standard base64"},
		{keyring(`{"id":"a","primary":1,"keys":[{"version":1,"key":"` + b641[:40] + `"}]}`), "KB_TEST_VAL: version 1: key is"},
		{base64.StdEncoding.EncodeToString([]byte(keyring(`{"id":"a","primary":7,"keys":[{"version":1,"key":"KEY1"}]}`))), "primary version 7 is not in the keyring"},
	} {
		t.Setenv("KB_TEST_VAL", c.val)
		_, err := local.FromEnv("KB_TEST_VAL")
		checkErr(t, err, c.want)
	}
}

func TestOpenURL(t *testing.T) {
	ctx := context.Background()
	path := writeFile(t, keyring(validKeyring), 0o600)
	p, err := provider.Open(ctx, "local://"+path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.(*local.Provider); !ok || p.Ref().KeyID != "meshhook" {
		t.Fatalf("Open(file URL) = %T %v", p, p.Ref())
	}
	t.Setenv("KB_TEST_URL", keyring(validKeyring))
	p, err = provider.Open(ctx, "local://env/KB_TEST_URL")
	if err != nil {
		t.Fatal(err)
	}
	if p.Ref().KeyID != "meshhook" {
		t.Fatalf("Open(env URL) ref = %v", p.Ref())
	}

	for _, c := range []struct{ url, want string }{
		{"local://keyring.json", "host must be empty (file) or env"},
		{"local://env/", "no environment variable name"},
		{"local://env", "no environment variable name"},
		{"local://env/1BAD", "malformed environment variable name"},
		{"local://env/KB_TEST_SURELY_UNSET", "environment variable KB_TEST_SURELY_UNSET is not set"},
		{"local:///" + path[1:] + "?token=s3cr3t", "query not allowed"},
		{"local://user:s3cr3t@/" + path, "user information not allowed"},
		{"local://" + path + "#s3cr3t", "fragment not allowed"},
		{"local:///nonexistent/keyring.json", "keyring file /nonexistent/keyring.json"},
	} {
		_, err := provider.Open(ctx, c.url)
		checkErr(t, err, c.want)
		if err != nil && strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("Open(%q) error %q echoes the URL", c.url, err)
		}
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := provider.Open(canceled, "local://"+path); !errors.Is(err, context.Canceled) {
		t.Errorf("Open with a canceled context: %v", err)
	}
}

func mustWrap(t *testing.T, p *local.Provider, dek, aad []byte) *provider.WrappedKey {
	t.Helper()
	wk, err := p.Wrap(context.Background(), dek, aad)
	if err != nil {
		t.Fatal(err)
	}
	return wk
}

func mustUnwrap(t *testing.T, p *local.Provider, wk *provider.WrappedKey, aad, want []byte) {
	t.Helper()
	got, err := p.Unwrap(context.Background(), wk, aad)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("Unwrap of version %s: %v", wk.Version, err)
	}
}

func savedFile(t *testing.T) (*local.Provider, string) {
	t.Helper()
	g, err := local.Generate("persist")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := g.Save(path); err != nil {
		t.Fatal(err)
	}
	p, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return p, path
}

func TestRotatePersisted(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	aad := []byte("tenant=1")
	dek1, dek2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	wk1 := mustWrap(t, p, dek1, aad)
	v, err := p.Rotate(ctx)
	if err != nil || v != "2" {
		t.Fatalf("Rotate = %q, %v; want \"2\"", v, err)
	}
	wk2 := mustWrap(t, p, dek2, aad)

	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("keyring file mode after rotation = %04o, want 0600", st.Mode().Perm())
	}
	if got := dirNames(t, filepath.Dir(path)); got != ".keyring.json.lock keyring.json" {
		t.Errorf("directory holds %q after rotation, want only the keyring and its lock file", got)
	}

	re, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := re.Describe(ctx)
	if err != nil || ds.PrimaryVersion != "2" || strings.Join(ds.Versions, ",") != "1,2" {
		t.Fatalf("reopened Describe = %+v, %v", ds, err)
	}
	mustUnwrap(t, re, wk1, aad, dek1)
	mustUnwrap(t, re, wk2, aad, dek2)
	if wk := mustWrap(t, re, dek1, aad); wk.Version != "2" {
		t.Fatalf("reopened keyring wraps under version %s, want 2", wk.Version)
	}
}

func TestRetire(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	aad := []byte("tenant=1")
	dek1, dek2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	wk1 := mustWrap(t, p, dek1, aad)
	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	wk2 := mustWrap(t, p, dek2, aad)

	err := p.Retire(ctx, "2")
	checkErr(t, err, "version 2: the primary version cannot be retired")
	if !errors.Is(err, local.ErrRetirePrimary) {
		t.Errorf("retiring the primary: %v, want ErrRetirePrimary", err)
	}
	for _, v := range []string{"3", "01", "x", ""} {
		if err := p.Retire(ctx, v); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("Retire(%q) = %v, want ErrKeyNotFound", v, err)
		}
	}
	mustUnwrap(t, p, wk1, aad, dek1)

	if err := p.Retire(ctx, "1"); err != nil {
		t.Fatal(err)
	}
	if err := p.Retire(ctx, "1"); err != nil {
		t.Fatalf("retiring a retired version again: %v", err)
	}
	for name, q := range map[string]*local.Provider{"same process": p, "reopened": reopen(t, path)} {
		got, err := q.Unwrap(ctx, wk1, aad)
		checkErr(t, err, "version 1 is retired", dek1)
		if !errors.Is(err, provider.ErrKeyNotFound) || got != nil {
			t.Errorf("%s: Unwrap under a retired version = %v, want ErrKeyNotFound", name, err)
		}
		if _, err := q.Rewrap(ctx, wk1, aad); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("%s: Rewrap under a retired version = %v, want ErrKeyNotFound", name, err)
		}
		mustUnwrap(t, q, wk2, aad, dek2)
		st, err := q.Describe(ctx)
		if err != nil || strings.Join(st.Versions, ",") != "2" {
			t.Errorf("%s: Describe after retiring 1 = %+v, %v", name, st, err)
		}
	}

	// The file no longer holds version 1's key but still records the version.
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Keys) != 2 || doc.Keys[0]["retired"] != true || doc.Keys[0]["key"] != nil || doc.Keys[1]["key"] == nil {
		t.Fatalf("keyring file after retiring version 1: %v", doc.Keys)
	}

	// Version numbers are never reused.
	if v, err := p.Rotate(ctx); err != nil || v != "3" {
		t.Fatalf("Rotate after retire = %q, %v; want \"3\"", v, err)
	}
}

func reopen(t *testing.T, path string) *local.Provider {
	t.Helper()
	p, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// dirNames lists the names in dir, space-separated, in order.
func dirNames(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return strings.Join(names, " ")
}

// TestRotateOverOtherHandle: a second handle on the same file that was
// opened before the first rotated builds on the first's rotation instead of
// overwriting it.
func TestRotateOverOtherHandle(t *testing.T) {
	ctx := context.Background()
	a, path := savedFile(t)
	if _, err := a.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	b := reopen(t, path) // versions 1 and 2, primary 2
	if _, err := a.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	dek := bytes.Repeat([]byte{9}, 32)
	wk := mustWrap(t, a, dek, nil) // version 3

	if v, err := b.Rotate(ctx); err != nil || v != "4" {
		t.Fatalf("Rotate over another handle's rotation = %q, %v; want \"4\"", v, err)
	}
	if err := b.Retire(ctx, "1"); err != nil {
		t.Fatalf("Retire over another handle's rotation: %v", err)
	}
	for _, q := range []*local.Provider{a, b, reopen(t, path)} {
		mustUnwrap(t, q, wk, nil, dek)
		if st, err := q.Describe(ctx); err != nil || st.PrimaryVersion != "4" || strings.Join(st.Versions, ",") != "2,3,4" {
			t.Errorf("Describe = %+v, %v; want primary 4, versions 2,3,4", st, err)
		}
	}

	// A keyring file loosened to 0644 is not written through.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	_, err := a.Rotate(ctx)
	checkErr(t, err, "accessible by group or others")
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("a refused Rotate modified the keyring file")
	}
}

func TestSave(t *testing.T) {
	p, err := local.Generate("save")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "k.json")
	if err := p.Save(path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("saved file: %v, mode %v", err, st.Mode())
	}
	before, _ := os.ReadFile(path)
	q, _ := local.Generate("save")
	err = q.Save(path)
	checkErr(t, err, "refusing to overwrite")
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("a refused Save changed the file")
	}
	if got := dirNames(t, filepath.Dir(path)); got != ".k.json.lock k.json" {
		t.Fatalf("directory holds %q after a refused Save, want only the keyring and its lock file", got)
	}
	err = p.Save(filepath.Join(t.TempDir(), "no", "such", "dir", "k.json"))
	checkErr(t, err, "no such file or directory")

	// Saving does not bind the provider to the file.
	if _, err := p.Rotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("Rotate of a generated keyring changed the file it was saved to")
	}
}

func TestGenerateID(t *testing.T) {
	for _, id := range []string{"", "-x", "a b", "a/b", strings.Repeat("a", 129), "é"} {
		_, err := local.Generate(id)
		checkErr(t, err, "keyring id must be")
	}
	for _, id := range []string{"a", "meshhook.prod_2-eu", strings.Repeat("a", 128)} {
		if _, err := local.Generate(id); err != nil {
			t.Errorf("Generate(%q): %v", id, err)
		}
	}
}

// TestRelabelled checks that the version is bound into the ciphertext: a
// version 2 ciphertext relabelled as version 1 fails authentication.
func TestRelabelled(t *testing.T) {
	ctx := context.Background()
	p, err := local.OpenFile(writeFile(t, keyring(validKeyring), 0o600))
	if err != nil {
		t.Fatal(err)
	}
	dek := bytes.Repeat([]byte{3}, 32)
	wk := mustWrap(t, p, dek, nil)
	bad := wk.Clone()
	bad.Version = "1"
	got, err := p.Unwrap(ctx, bad, nil)
	checkErr(t, err, "invalid ciphertext", dek)
	if !errors.Is(err, provider.ErrInvalidCiphertext) || got != nil {
		t.Fatalf("relabelled version: %v", err)
	}
	for _, v := range []string{"02", "+2", "0", "", "2.0", "4294967296"} {
		bad.Version = v
		_, err := p.Unwrap(ctx, bad, nil)
		if !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("version %q: %v, want ErrKeyNotFound", v, err)
		}
	}
}

func TestCanceledContext(t *testing.T) {
	p, _ := savedFile(t)
	wk := mustWrap(t, p, bytes.Repeat([]byte{1}, 32), nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.Rotate(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Rotate: %v", err)
	}
	if err := p.Retire(ctx, "1"); !errors.Is(err, context.Canceled) {
		t.Errorf("Retire: %v", err)
	}
	if _, err := p.Rewrap(ctx, wk, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Rewrap: %v", err)
	}
	if _, err := p.Describe(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Describe: %v", err)
	}
}

// TestConcurrentRotateRetire wraps and unwraps from several goroutines
// while another rotates and retires; run with -race.
func TestConcurrentRotateRetire(t *testing.T) {
	ctx := context.Background()
	p, _ := savedFile(t)
	const rotations = 20
	wrapUnwrapWhile(t, p, 4, 200, func() error {
		for i := range rotations {
			if _, err := p.Rotate(ctx); err != nil {
				return err
			}
			if i > 0 {
				if err := p.Retire(ctx, strconv.Itoa(i)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	st, err := p.Describe(ctx)
	if err != nil || st.PrimaryVersion != strconv.Itoa(rotations+1) || len(st.Versions) != 2 {
		t.Fatalf("after concurrent rotation: %+v, %v", st, err)
	}
}

// wrapUnwrapWhile runs workers goroutines that each wrap and unwrap a DEK
// ops times on p while change (rotating and retiring, through p or another
// handle) runs in one more, and reports every error. A wrap's version may
// be retired before its unwrap, so ErrKeyNotFound there is expected.
func wrapUnwrapWhile(t *testing.T, p *local.Provider, workers, ops int, change func() error) {
	t.Helper()
	ctx := context.Background()
	errs := make(chan error, workers+1)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			dek := bytes.Repeat([]byte{5}, 32)
			for range ops {
				wk, err := p.Wrap(ctx, dek, nil)
				if err != nil {
					errs <- err
					return
				}
				got, err := p.Unwrap(ctx, wk, nil)
				if err != nil && !errors.Is(err, provider.ErrKeyNotFound) {
					errs <- err
					return
				}
				if err == nil && !bytes.Equal(got, dek) {
					errs <- errors.New("DEK mismatch")
					return
				}
			}
		})
	}
	wg.Go(func() {
		if err := change(); err != nil {
			errs <- err
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
