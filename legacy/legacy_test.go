package legacy_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/legacy"
)

// TestChainOrder: the first decoder that claims a value decides it; "not
// mine" moves on; "mine but broken" stops the chain before Plaintext.
func TestChainOrder(t *testing.T) {
	broken := errors.New("legacy: test decoder: broken value")
	var calls []string
	hook := legacy.Func(func(stored []byte) ([]byte, bool, error) {
		calls = append(calls, "hook")
		switch {
		case bytes.HasPrefix(stored, []byte("hook:")):
			return bytes.ToUpper(stored[5:]), true, nil
		case bytes.HasPrefix(stored, []byte("bad:")):
			return []byte("partial"), false, broken
		}
		return nil, false, nil
	})
	c, err := legacy.NewChain(hook, legacy.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		in, want string
		err      error
	}{
		{"hook:abc", "ABC", nil},
		{"plain", "plain", nil},
		{"bad:xyz", "", broken},
	} {
		calls = nil
		pt, ok, err := c.Decode([]byte(tc.in))
		if !errors.Is(err, tc.err) || string(pt) != tc.want || ok != (tc.err == nil) || len(calls) != 1 {
			t.Errorf("%q: %q, ok=%v, err=%v, calls %v", tc.in, pt, ok, err, calls)
		}
		if tc.err != nil && pt != nil {
			t.Errorf("%q: plaintext returned with an error", tc.in)
		}
	}

	// Without Plaintext at the end, an unclaimed value is "not mine" for the
	// chain too, so chains nest.
	inner, err := legacy.NewChain(hook)
	if err != nil {
		t.Fatal(err)
	}
	if pt, ok, err := inner.Decode([]byte("plain")); pt != nil || ok || err != nil {
		t.Errorf("unclaimed value: %q %v %v", pt, ok, err)
	}
	outer, err := legacy.NewChain(inner, legacy.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	if pt, ok, err := outer.Decode([]byte("hook:x")); string(pt) != "X" || !ok || err != nil {
		t.Errorf("nested chain: %q %v %v", pt, ok, err)
	}
}

// TestNewChainRejects: configurations that could not do what they say.
func TestNewChainRejects(t *testing.T) {
	hook := legacy.Func(func([]byte) ([]byte, bool, error) { return nil, false, nil })
	for name, ds := range map[string][]legacy.Decoder{
		"empty":                 nil,
		"nil decoder":           {hook, nil},
		"Plaintext not last":    {legacy.Plaintext(), hook},
		"Plaintext twice":       {legacy.Plaintext(), legacy.Plaintext()},
		"nil Func is a nil one": {legacy.Decoder(nil)},
	} {
		c, err := legacy.NewChain(ds...)
		if err == nil || c != nil || !strings.HasPrefix(err.Error(), "legacy: NewChain: ") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestOpen: the URL forms, read from the environment; malformed URLs are
// refused without echoing them.
func TestOpen(t *testing.T) {
	keyText := hex.EncodeToString(randBytes(t, 32))
	stored := nodeSeal(t, keyText, []byte("from env")).Values[0].Stored
	t.Setenv("LEGACY_TEST_KEY", keyText)
	t.Setenv("LEGACY_TEST_SHORT", "short")

	d, err := legacy.Open("meshhook-v1://env/LEGACY_TEST_KEY")
	if err != nil {
		t.Fatal(err)
	}
	if pt, ok, err := d.Decode([]byte(stored)); string(pt) != "from env" || !ok || err != nil {
		t.Fatalf("decoder from URL: %q %v %v", pt, ok, err)
	}
	p, err := legacy.Open("plaintext://")
	if err != nil {
		t.Fatal(err)
	}
	if pt, ok, err := p.Decode([]byte(stored)); string(pt) != stored || !ok || err != nil {
		t.Fatalf("plaintext from URL: %q %v %v", pt, ok, err)
	}

	for _, c := range []struct{ url, wantIn string }{
		{"", "malformed decoder URL"},
		{"meshhook-v1:" + keyText, "malformed decoder URL"},
		{"meshhook-v1://" + keyText, "want meshhook-v1://env/VARNAME"},
		{"meshhook-v1://env/" + keyText + "!", "want meshhook-v1://env/VARNAME"},
		{"meshhook-v1://env/LEGACY_TEST_KEY?k=" + keyText, "want meshhook-v1://env/VARNAME"},
		{"meshhook-v1://env/", "want meshhook-v1://env/VARNAME"},
		{"meshhook-v1://env/LEGACY_TEST_UNSET", "LEGACY_TEST_UNSET is not set"},
		{"meshhook-v1://env/LEGACY_TEST_SHORT", "LEGACY_TEST_SHORT: legacy: MeshHook key is not"},
		{"plaintext://" + keyText, "nothing may follow"},
		{"plaintext:", "malformed decoder URL"},
		{"Vault://x", "malformed decoder URL"},
		{"local://env/LEGACY_TEST_KEY", "unknown decoder scheme local"},
	} {
		d, err := legacy.Open(c.url)
		if err == nil || d != nil {
			t.Errorf("%q: accepted", c.url)
			continue
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "legacy: ") || !strings.Contains(msg, c.wantIn) ||
			strings.Contains(msg, keyText) || strings.Contains(msg, "short\"") {
			t.Errorf("%q: error %q, want one containing %q and no key", c.url, msg, c.wantIn)
		}
	}
}
