package local

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/profullstack/keybroker/provider"
)

// Scheme is the URL scheme this package registers with provider.Register.
const Scheme = "local"

// KeySize is the length in bytes of every key version: an AES-256 key.
const KeySize = 32

// formatV1 is the first byte of every ciphertext this package produces.
// Unwrap refuses any other value, which leaves room for a later format.
const formatV1 = 0x01

// adLabel starts the GCM additional data, so a wrapped key cannot be
// mistaken for a ciphertext of any other format under the same key.
const adLabel = "keybroker/local/v1\x00"

// overhead is what Wrap adds to a DEK: format byte, 96-bit nonce, 128-bit tag.
const overhead = 1 + 12 + 16

// Errors that callers may want to tell apart with errors.Is. Each is carried
// as the Err of a *provider.Error.
var (
	// ErrRetirePrimary: Retire was asked to retire the primary version.
	ErrRetirePrimary = errors.New("the primary version cannot be retired; rotate first")
	// ErrReadOnly: Rotate or Retire on a keyring loaded from an environment
	// variable, where a change could not be persisted.
	ErrReadOnly = errors.New("keyring is read-only")
	// ErrKeyringChanged: the keyring file was modified by someone else since
	// this Provider read or wrote it, so persisting a change would lose theirs.
	ErrKeyringChanged = errors.New("keyring file changed on disk since it was loaded; reopen it and retry")
)

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Provider is a KEKProvider whose key versions live in process memory,
// loaded from a keyring file, an environment variable, or generated. It is
// safe for concurrent use.
type Provider struct {
	id       string
	adPrefix []byte // adLabel, len(id), id; immutable
	path     string // keyring file that Rotate and Retire persist to, symbolic links resolved at open; "" if none
	src      string // the keyring file as named at open (absolute), which calls follow
	envName  string // environment variable the keyring came from; "" if none

	// writeMu serialises everything that reads or writes the keyring file:
	// re-reads, Rotate, Retire and Save. Only holders of writeMu change
	// versions, primary or seen, or read raw key bytes, so a holder may read
	// them without mu.
	writeMu sync.Mutex
	fileSum [32]byte // SHA-256 of the keyring file as last read or written

	mu       sync.RWMutex
	primary  uint32
	versions map[uint32]*keyVersion // every version ever made, retired ones included
	seen     fileID                 // the keyring file as last read, written or failed to read
	stale    error                  // why the last re-read failed; nil if it did not
}

var (
	_ provider.KEKProvider = (*Provider)(nil)
	_ provider.Rotator     = (*Provider)(nil)
	_ provider.Rewrapper   = (*Provider)(nil)
	_ provider.Describer   = (*Provider)(nil)
	_ provider.Retirer     = (*Provider)(nil)
	_ provider.Refresher   = (*Provider)(nil)
)

// keyVersion is immutable once in the map, except that key is cleared after
// the version has been replaced by its retired form.
type keyVersion struct {
	n       uint32
	created time.Time   // zero if the keyring file did not record it
	key     []byte      // nil when retired
	aead    cipher.AEAD // nil when retired
}

func (v *keyVersion) retired() bool { return v.aead == nil }

func newKeyVersion(n uint32, key []byte, created time.Time) (*keyVersion, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("version %d: key is %d bytes, want %d", n, len(key), KeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("version %d: %v", n, err)
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		return nil, fmt.Errorf("version %d: %v", n, err)
	}
	return &keyVersion{n: n, created: created, key: key, aead: aead}, nil
}

func randomKeyVersion(n uint32) (*keyVersion, error) {
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	return newKeyVersion(n, key, time.Now().UTC().Truncate(time.Second))
}

func newProvider(id string, primary uint32, versions map[uint32]*keyVersion) *Provider {
	ad := make([]byte, 0, len(adLabel)+1+len(id))
	ad = append(ad, adLabel...)
	ad = append(ad, byte(len(id))) // id is at most 128 bytes
	ad = append(ad, id...)
	return &Provider{id: id, adPrefix: ad, primary: primary, versions: versions}
}

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("keyring id must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit (got %d bytes)", len(id))
	}
	return nil
}

// Generate returns a provider for a new in-memory keyring named id with one
// random key version, "1", as primary. id must be 1-128 characters from
// [A-Za-z0-9._-], starting with a letter or digit. Rotate and Retire change
// only memory; use Save to write the keyring to a file.
func Generate(id string) (*Provider, error) {
	if err := checkID(id); err != nil {
		return nil, opErr("generate", nil, err)
	}
	v, err := randomKeyVersion(1)
	if err != nil {
		return nil, opErr("generate", nil, err)
	}
	return newProvider(id, 1, map[uint32]*keyVersion{1: v}), nil
}

func opErr(op string, kind, err error) error {
	return &provider.Error{Provider: Scheme, Op: op, Kind: kind, Err: err}
}

// Ref returns {Provider: "local", KeyID: the keyring id}.
func (p *Provider) Ref() provider.KeyRef { return provider.KeyRef{Provider: Scheme, KeyID: p.id} }

// additionalData binds the keyring id and key version to the caller's aad,
// so a ciphertext relabelled with another id or version fails to open.
func (p *Provider) additionalData(n uint32, aad []byte) []byte {
	ad := make([]byte, 0, len(p.adPrefix)+4+len(aad))
	ad = append(ad, p.adPrefix...)
	ad = binary.BigEndian.AppendUint32(ad, n)
	return append(ad, aad...)
}

// Wrap encrypts dek (16 to 64 bytes) with AES-256-GCM under the primary
// version (for a keyring file, the primary the file names at the time of
// the call; see the package doc) and a fresh random 96-bit nonce. The
// ciphertext is 0x01 || nonce || sealed dek || tag; the GCM additional data
// binds the keyring id, the version and aad.
func (p *Provider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := provider.CheckDEK(Scheme, dek); err != nil {
		return nil, err
	}
	p.follow()
	p.mu.RLock()
	v := p.versions[p.primary]
	p.mu.RUnlock()
	return p.seal(v, dek, aad), nil
}

func (p *Provider) seal(v *keyVersion, dek, aad []byte) *provider.WrappedKey {
	out := make([]byte, 1, overhead+len(dek))
	out[0] = formatV1
	out = v.aead.Seal(out, nil, dek, p.additionalData(v.n, aad))
	return &provider.WrappedKey{
		Provider:   Scheme,
		KeyID:      p.id,
		Version:    strconv.FormatUint(uint64(v.n), 10),
		Ciphertext: out,
	}
}

// Unwrap returns the DEK in wk. A version this keyring never had, or has
// retired, yields ErrKeyNotFound (for a keyring file, a version it never
// had only after re-reading the file, in case another process added it);
// any other failure (tampering, wrong aad) yields ErrInvalidCiphertext.
func (p *Provider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return p.open("unwrap", wk, aad)
}

func (p *Provider) open(op string, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := provider.CheckWrappedKey(p.Ref(), op, wk); err != nil {
		return nil, err
	}
	n, ok := parseVersion(wk.Version)
	if !ok {
		return nil, opErr(op, provider.ErrKeyNotFound, errors.New("malformed key version"))
	}
	p.follow()
	p.mu.RLock()
	v := p.versions[n]
	p.mu.RUnlock()
	if v == nil && p.path != "" {
		// Another process may have rotated in a way the file's identity
		// did not show; ask the file itself before saying no.
		p.writeMu.Lock()
		if p.reload() == nil {
			p.mu.RLock()
			v = p.versions[n]
			p.mu.RUnlock()
		}
		p.writeMu.Unlock()
	}
	if v == nil {
		return nil, opErr(op, provider.ErrKeyNotFound, fmt.Errorf("keyring %s has no version %d", p.id, n))
	}
	if v.retired() {
		return nil, opErr(op, provider.ErrKeyNotFound, fmt.Errorf("keyring %s version %d is retired", p.id, n))
	}
	ct := wk.Ciphertext
	if len(ct) < overhead+provider.MinDEKLen || len(ct) > overhead+provider.MaxDEKLen || ct[0] != formatV1 {
		return nil, opErr(op, provider.ErrInvalidCiphertext, nil)
	}
	dek, err := v.aead.Open(nil, nil, ct[1:], p.additionalData(n, aad))
	if err != nil {
		return nil, opErr(op, provider.ErrInvalidCiphertext, nil)
	}
	return dek, nil
}

// parseVersion accepts only the canonical decimal form Wrap writes: no sign,
// no leading zeros, 1..2^32-1.
func parseVersion(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != s {
		return 0, false
	}
	return uint32(n), true
}

// Rewrap unwraps wk and wraps the DEK again under the primary version with
// the same aad, clearing the DEK in between. The DEK never leaves the
// process, but it does pass through memory: this is a local provider.
func (p *Provider) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	dek, err := p.open("rewrap", wk, aad)
	if err != nil {
		return nil, err
	}
	defer provider.Clear(dek)
	p.mu.RLock()
	v := p.versions[p.primary]
	p.mu.RUnlock()
	return p.seal(v, dek, aad), nil
}

// Describe reports the primary version and the versions that still unwrap,
// in ascending order. A keyring file is re-read first if it changed; if the
// file can no longer be read or parsed, Describe returns that error (the
// provider goes on serving the keyring as last read) until a re-read
// succeeds.
func (p *Provider) Describe(ctx context.Context) (provider.Status, error) {
	if err := ctx.Err(); err != nil {
		return provider.Status{}, err
	}
	p.follow()
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.stale != nil {
		return provider.Status{}, p.staleError("describe", p.stale)
	}
	st := provider.Status{
		Ref:            p.Ref(),
		PrimaryVersion: strconv.FormatUint(uint64(p.primary), 10),
		Reachable:      true,
	}
	for _, n := range sortedVersions(p.versions) {
		if !p.versions[n].retired() {
			st.Versions = append(st.Versions, strconv.FormatUint(uint64(n), 10))
		}
	}
	return st, nil
}

func sortedVersions(m map[uint32]*keyVersion) []uint32 {
	ns := make([]uint32, 0, len(m))
	for n := range m {
		ns = append(ns, n)
	}
	slices.Sort(ns)
	return ns
}

// Rotate adds a random key version, one above the highest version the
// keyring has ever had, and makes it primary. Earlier versions still
// unwrap. For a keyring opened from a file, the file is rewritten
// atomically before the new version is used; if that fails, nothing
// changes. A keyring from an environment variable cannot rotate
// (ErrReadOnly).
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := p.checkWritable("rotate"); err != nil {
		return "", err
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.path != "" {
		unlock, err := p.lockForWrite("rotate")
		if err != nil {
			return "", err
		}
		defer unlock()
	}
	ns := sortedVersions(p.versions)
	top := ns[len(ns)-1]
	if top == math.MaxUint32 {
		return "", opErr("rotate", nil, errors.New("keyring has run out of version numbers"))
	}
	v, err := randomKeyVersion(top + 1)
	if err != nil {
		return "", opErr("rotate", nil, err)
	}
	id, err := p.persist("rotate", v.n, v)
	if err != nil {
		provider.Clear(v.key)
		return "", err
	}
	p.mu.Lock()
	p.versions[v.n] = v
	p.primary = v.n
	p.seen = id
	p.mu.Unlock()
	return strconv.FormatUint(uint64(v.n), 10), nil
}

// Retire destroys the key material of version, after which keys wrapped
// under it fail to unwrap with ErrKeyNotFound. The version number stays in
// the keyring, marked retired, so it is never reused. Retiring the primary
// is refused (ErrRetirePrimary); retiring a retired version does nothing;
// an unknown version yields ErrKeyNotFound. For a keyring opened from a
// file, the file is rewritten atomically first; if that fails, nothing
// changes. Retirement cannot be undone except from a backup of the file.
func (p *Provider) Retire(ctx context.Context, version string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := p.checkWritable("retire"); err != nil {
		return err
	}
	n, ok := parseVersion(version)
	if !ok {
		return opErr("retire", provider.ErrKeyNotFound, errors.New("malformed key version"))
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if p.path != "" {
		unlock, err := p.lockForWrite("retire")
		if err != nil {
			return err
		}
		defer unlock()
	}
	old := p.versions[n]
	switch {
	case old == nil:
		return opErr("retire", provider.ErrKeyNotFound, fmt.Errorf("keyring %s has no version %d", p.id, n))
	case old.retired():
		return nil
	case n == p.primary:
		return opErr("retire", nil, fmt.Errorf("version %d: %w", n, ErrRetirePrimary))
	}
	gone := &keyVersion{n: n, created: old.created}
	id, err := p.persist("retire", p.primary, gone)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.versions[n] = gone
	p.seen = id
	p.mu.Unlock()
	// Concurrent Unwraps may still hold old.aead, whose key schedule the
	// runtime owns; the raw key is ours to clear.
	provider.Clear(old.key)
	return nil
}

// Refresh re-reads the keyring file now, whether or not it looks changed,
// and reports why it could not (the provider then keeps serving the
// keyring as last read). Keyrings not backed by a file have nothing to
// re-read: Refresh returns nil.
func (p *Provider) Refresh(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if p.path == "" {
		return nil
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if err := p.reload(); err != nil {
		return p.staleError("refresh", err)
	}
	return nil
}

// follow re-reads the keyring file if it is not the one last read or
// written, judged by one stat (fileID). The cost on every call is that
// stat; the re-read happens once per change.
func (p *Provider) follow() {
	if p.path == "" {
		return
	}
	id := statID(p.src)
	p.mu.RLock()
	same := id == p.seen
	p.mu.RUnlock()
	if same {
		return
	}
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if statID(p.src) != p.seen { // another call may have re-read it meanwhile
		p.reload() // a failure is kept in p.stale for Describe
	}
}

// reload reads the keyring file and, if its bytes differ from what p last
// read or wrote, replaces p's versions and primary with the file's. If the
// file cannot be read or parsed, or names another keyring, p keeps what it
// has and records why in p.stale. Caller holds writeMu.
func (p *Provider) reload() error {
	data, id, err := readKeyringFile(p.src)
	if err != nil {
		return p.markStale(id, err)
	}
	defer provider.Clear(data)
	sum := sha256.Sum256(data)
	if sum == p.fileSum {
		p.mu.Lock()
		p.seen, p.stale = id, nil
		p.mu.Unlock()
		return nil
	}
	q, err := parseKeyring(data)
	if err != nil {
		return p.markStale(id, err)
	}
	if q.id != p.id {
		for _, v := range q.versions {
			provider.Clear(v.key)
		}
		return p.markStale(id, fmt.Errorf("keyring id is now %q, was %q; restart to use another keyring", q.id, p.id))
	}
	p.mu.Lock()
	old := p.versions
	p.primary, p.versions, p.seen, p.stale = q.primary, q.versions, id, nil
	p.mu.Unlock()
	p.fileSum = sum
	// Calls in flight may still hold the old versions' AEADs, whose key
	// schedules the runtime owns; the raw keys are ours to clear.
	for _, v := range old {
		provider.Clear(v.key)
	}
	return nil
}

func (p *Provider) markStale(id fileID, err error) error {
	if id == (fileID{}) { // refused before it was opened: remember what stat sees
		id = statID(p.src)
	}
	p.mu.Lock()
	p.seen, p.stale = id, err
	p.mu.Unlock()
	return err
}

// staleError reports that re-reading the keyring file failed with err and
// the provider goes on with the keyring it read before. Its kind is
// provider.ErrUnavailable: the keys in memory still work, what is missing
// is news from the file.
func (p *Provider) staleError(op string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err // the path is already in the message
	}
	return opErr(op, provider.ErrUnavailable, fmt.Errorf("keyring file %s: %w (still using the keyring as last read)", p.src, err))
}

func (p *Provider) checkWritable(op string) error {
	if p.envName != "" {
		return opErr(op, nil, fmt.Errorf("%w: loaded from environment variable %s; change the keyring file it was made from", ErrReadOnly, p.envName))
	}
	return nil
}
