package local_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// helperEnv carries a helperSpec to a copy of this test binary that acts as
// another process sharing the keyring file.
const helperEnv = "KEYBROKER_LOCAL_TEST_HELPER"

// helperSpec is what the helper process does, in this order: open the
// keyring file; if Wait, print "opened" and wait for a line on stdin;
// rotate; retire Retire; wrap DEK with AAD.
type helperSpec struct {
	Keyring string
	Wait    bool
	Rotate  bool
	Retire  string
	DEK     []byte
	AAD     []byte
}

type helperResult struct {
	Rotated string
	Wrapped *provider.WrappedKey
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		if err := runAsHelper(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runAsHelper(raw string) error {
	var spec helperSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		return err
	}
	ctx := context.Background()
	p, err := local.OpenFile(spec.Keyring)
	if err != nil {
		return err
	}
	if spec.Wait {
		fmt.Println("opened")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			return err
		}
	}
	var res helperResult
	if spec.Rotate {
		if res.Rotated, err = p.Rotate(ctx); err != nil {
			return err
		}
	}
	if spec.Retire != "" {
		if err := p.Retire(ctx, spec.Retire); err != nil {
			return err
		}
	}
	if spec.DEK != nil {
		if res.Wrapped, err = p.Wrap(ctx, spec.DEK, spec.AAD); err != nil {
			return err
		}
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// helperCmd returns the command that runs spec in another process.
func helperCmd(t *testing.T, spec helperSpec) *exec.Cmd {
	t.Helper()
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(raw))
	cmd.Stderr = new(bytes.Buffer)
	return cmd
}

// runHelper runs spec in another process and returns what it reports.
func runHelper(t *testing.T, spec helperSpec) helperResult {
	t.Helper()
	cmd := helperCmd(t, spec)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper process: %v: %s", err, cmd.Stderr)
	}
	var res helperResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	return res
}

// TestFollowsRotationInOtherProcess: a Provider opened before another
// process rotated wraps under the new version, unwraps what the other
// process wrapped under it, and rotates on top of it.
func TestFollowsRotationInOtherProcess(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	aad := []byte("tenant=1")
	dek1, dek2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	wk1 := mustWrap(t, p, dek1, aad)

	res := runHelper(t, helperSpec{Keyring: path, Rotate: true, DEK: dek2, AAD: aad})
	if res.Rotated != "2" || res.Wrapped.Version != "2" {
		t.Fatalf("helper rotated to %q and wrapped under %q, want 2", res.Rotated, res.Wrapped.Version)
	}

	if wk := mustWrap(t, p, dek1, aad); wk.Version != "2" {
		t.Errorf("Wrap after another process rotated uses version %s, want 2", wk.Version)
	}
	mustUnwrap(t, p, res.Wrapped, aad, dek2)
	mustUnwrap(t, p, wk1, aad, dek1)
	if st, err := p.Describe(ctx); err != nil || st.PrimaryVersion != "2" || strings.Join(st.Versions, ",") != "1,2" {
		t.Errorf("Describe after another process rotated = %+v, %v", st, err)
	}
	if v, err := p.Rotate(ctx); err != nil || v != "3" {
		t.Fatalf("Rotate after another process rotated = %q, %v; want \"3\"", v, err)
	}
	mustUnwrap(t, reopen(t, path), res.Wrapped, aad, dek2)
}

// TestFollowsRetireInOtherProcess: after another process runs the
// equivalent of `keybroker rotate --retire`, a Provider opened before it
// never wraps under the retired version again, and no longer unwraps
// under it.
func TestFollowsRetireInOtherProcess(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	dek := bytes.Repeat([]byte{1}, 32)
	wk1 := mustWrap(t, p, dek, nil)

	runHelper(t, helperSpec{Keyring: path, Rotate: true, Retire: "1"})

	if wk := mustWrap(t, p, dek, nil); wk.Version != "2" {
		t.Errorf("Wrap after another process retired version 1 uses version %s, want 2", wk.Version)
	}
	_, err := p.Unwrap(ctx, wk1, nil)
	checkErr(t, err, "version 1 is retired", dek)
	if !errors.Is(err, provider.ErrKeyNotFound) {
		t.Errorf("Unwrap under a version retired elsewhere = %v, want ErrKeyNotFound", err)
	}
	if st, err := p.Describe(ctx); err != nil || st.PrimaryVersion != "2" || strings.Join(st.Versions, ",") != "2" {
		t.Errorf("Describe after another process retired = %+v, %v", st, err)
	}
}

// TestRotationsInTwoProcessesAtOnce: two processes that opened the same
// keyring rotate at the same moment; the lock makes the second build on the
// first, so both succeed and the file keeps both new versions.
func TestRotationsInTwoProcessesAtOnce(t *testing.T) {
	_, path := savedFile(t)
	type proc struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		out   *bufio.Reader
	}
	var ps []proc
	for range 2 {
		cmd := helperCmd(t, helperSpec{Keyring: path, Wait: true, Rotate: true})
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		ps = append(ps, proc{cmd, stdin, bufio.NewReader(stdout)})
	}
	// Both have read the keyring (version 1) before either rotates.
	for _, p := range ps {
		if line, err := p.out.ReadString('\n'); err != nil || line != "opened\n" {
			t.Fatalf("helper: %q, %v: %s", line, err, p.cmd.Stderr)
		}
	}
	for _, p := range ps {
		if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for _, p := range ps {
		out, _ := io.ReadAll(p.out)
		err := p.cmd.Wait()
		var res helperResult
		if err != nil || json.Unmarshal(out, &res) != nil {
			t.Errorf("helper rotation: %v: %s", err, p.cmd.Stderr)
			continue
		}
		got = append(got, res.Rotated)
	}
	slices.Sort(got)
	if strings.Join(got, ",") != "2,3" {
		t.Errorf("concurrent rotations made versions %q, want 2 and 3", got)
	}
	if st, err := reopen(t, path).Describe(context.Background()); err != nil || strings.Join(st.Versions, ",") != "1,2,3" {
		t.Errorf("keyring after two concurrent rotations = %+v, %v; want versions 1,2,3", st, err)
	}
}

// keyOf returns the base64 key of version n as the keyring file at path
// records it.
func keyOf(t *testing.T, path string, n uint32) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Keys []struct {
			Version uint32
			Key     string
		}
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	for _, k := range doc.Keys {
		if k.Version == n && k.Key != "" {
			return k.Key
		}
	}
	t.Fatalf("keyring file has no key for version %d", n)
	return ""
}

// leaveTemp puts a copy of the keyring file where a writer killed mid-write
// would have left it.
func leaveTemp(t *testing.T, path, suffix string) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-"+suffix)
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return tmp
}

// TestLeftoverTempFiles: temporary files a killed writer left behind, with
// every key in them, are removed on open and on the next write, so after a
// retire no file in the directory holds the retired key.
func TestLeftoverTempFiles(t *testing.T) {
	ctx := context.Background()
	g, err := local.Generate("leftover")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "keyring.json")
	if err := g.Save(path); err != nil {
		t.Fatal(err)
	}
	key1 := keyOf(t, path, 1)
	tmp := leaveTemp(t, path, "1111")
	other := filepath.Join(dir, ".other.json.tmp-1111") // another keyring's: not ours to remove
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	p := reopen(t, path)
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover temporary file after OpenFile: %v, want it gone", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another keyring's temporary file: %v, want it kept", err)
	}

	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	tmp = leaveTemp(t, path, "2222") // a crash after this process opened the file
	if err := p.Retire(ctx, "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover temporary file after Retire: %v, want it gone", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte(key1)) {
			t.Errorf("%s still holds retired version 1's key", e.Name())
		}
	}
	st, err := os.Stat(filepath.Join(dir, ".keyring.json.lock"))
	if err != nil || st.Mode().Perm() != 0o600 || st.Size() != 0 {
		t.Errorf("lock file: %v, mode %v; want empty, 0600", err, st.Mode())
	}
}

// replaceFile installs content at path the way an operator's tool might:
// written beside it and renamed over it.
func replaceFile(t *testing.T, path string, content []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, content, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestFollowBrokenFile: when the keyring file turns unreadable or
// malformed, the Provider keeps serving the keyring it had, and Describe
// and Refresh say why until the file is good again.
func TestFollowBrokenFile(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	dek := bytes.Repeat([]byte{1}, 32)
	wk1 := mustWrap(t, p, dek, nil)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	other, err := local.Generate("another-keyring")
	if err != nil {
		t.Fatal(err)
	}
	otherPath := filepath.Join(t.TempDir(), "other.json")
	if err := other.Save(otherPath); err != nil {
		t.Fatal(err)
	}
	otherDoc, err := os.ReadFile(otherPath)
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name, want string
		breakIt    func()
	}{
		// os.WriteFile truncates and writes in place: same inode, new size.
		{"malformed in place", "malformed JSON", func() {
			if err := os.WriteFile(path, good[:len(good)/2], 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"another keyring", `keyring id is now "another-keyring", was "persist"`, func() { replaceFile(t, path, otherDoc) }},
		{"loosened mode", "accessible by group or others", func() {
			if err := os.Chmod(path, 0o644); err != nil {
				t.Fatal(err)
			}
		}},
		{"removed", "no such file or directory", func() {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.breakIt()
			if wk := mustWrap(t, p, dek, nil); wk.Version != "1" {
				t.Errorf("Wrap with a broken keyring file uses version %s, want 1", wk.Version)
			}
			mustUnwrap(t, p, wk1, nil, dek)
			_, err := p.Describe(ctx)
			checkErr(t, err, c.want)
			checkErr(t, err, "(still using the keyring as last read)")
			if !errors.Is(err, provider.ErrUnavailable) {
				t.Errorf("Describe with a broken keyring file = %v, want ErrUnavailable", err)
			}
			err = p.Refresh(ctx)
			checkErr(t, err, c.want)
			if !errors.Is(err, provider.ErrUnavailable) {
				t.Errorf("Refresh of a broken keyring file = %v, want ErrUnavailable", err)
			}

			replaceFile(t, path, good)
			if err := p.Refresh(ctx); err != nil {
				t.Errorf("Refresh of the repaired file: %v", err)
			}
			if st, err := p.Describe(ctx); err != nil || st.PrimaryVersion != "1" {
				t.Errorf("Describe of the repaired file = %+v, %v", st, err)
			}
		})
	}
}

// TestRefreshNotFileBacked: keyrings without a file have nothing to
// re-read.
func TestRefreshNotFileBacked(t *testing.T) {
	g, err := local.Generate("mem")
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Refresh(context.Background()); err != nil {
		t.Errorf("Refresh of a generated keyring: %v", err)
	}
	t.Setenv("KB_TEST_KEYRING", base64.StdEncoding.EncodeToString([]byte(keyring(validKeyring))))
	e, err := local.FromEnv("KB_TEST_KEYRING")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Refresh(context.Background()); err != nil {
		t.Errorf("Refresh of an environment keyring: %v", err)
	}
}

// TestFollowWhileAnotherHandleRotates wraps and unwraps from several
// goroutines while another handle on the file rotates and retires, so the
// re-reads race with the calls; run with -race.
func TestFollowWhileAnotherHandleRotates(t *testing.T) {
	ctx := context.Background()
	p, path := savedFile(t)
	q := reopen(t, path)
	const rotations = 10
	wrapUnwrapWhile(t, p, 4, 100, func() error {
		for i := range rotations {
			if _, err := q.Rotate(ctx); err != nil {
				return err
			}
			if err := q.Retire(ctx, strconv.Itoa(i+1)); err != nil {
				return err
			}
		}
		return nil
	})
	st, err := p.Describe(ctx)
	if err != nil || st.PrimaryVersion != strconv.Itoa(rotations+1) || strings.Join(st.Versions, ",") != strconv.Itoa(rotations+1) {
		t.Fatalf("after another handle's rotations: %+v, %v", st, err)
	}
	if wk := mustWrap(t, p, bytes.Repeat([]byte{5}, 32), nil); wk.Version != strconv.Itoa(rotations+1) {
		t.Fatalf("Wrap uses version %s, want %d", wk.Version, rotations+1)
	}
}

// TestFollowRepointedLink: a keyring named through a symbolic link that is
// re-pointed to a new file (a Kubernetes Secret volume update swaps such a
// link) is followed; writing through the moved link is refused.
func TestFollowRepointedLink(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	g, err := local.Generate("linked")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Save(filepath.Join(dir, "a", "keyring.json")); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "keyring.json")
	if err := os.Symlink("a/keyring.json", link); err != nil {
		t.Fatal(err)
	}
	p := reopen(t, link)
	dek := bytes.Repeat([]byte{3}, 32)
	wk1 := mustWrap(t, p, dek, nil)

	// The new file: the same keyring, rotated.
	if _, err := g.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Save(filepath.Join(dir, "b", "keyring.json")); err != nil {
		t.Fatal(err)
	}
	tmpLink := filepath.Join(dir, "keyring.json.new")
	if err := os.Symlink("b/keyring.json", tmpLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmpLink, link); err != nil {
		t.Fatal(err)
	}

	if wk := mustWrap(t, p, dek, nil); wk.Version != "2" {
		t.Errorf("Wrap after the link moved uses version %s, want 2", wk.Version)
	}
	mustUnwrap(t, p, wk1, nil, dek)
	_, err = p.Rotate(ctx)
	checkErr(t, err, "now resolves to "+filepath.Join(dir, "b", "keyring.json"))
	if st, err := reopen(t, filepath.Join(dir, "b", "keyring.json")).Describe(ctx); err != nil || st.PrimaryVersion != "2" {
		t.Errorf("the new file after a refused Rotate: %+v, %v", st, err)
	}
}
