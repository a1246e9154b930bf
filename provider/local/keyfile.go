package local

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/profullstack/keybroker/provider"
)

// MaxKeyringSize bounds a keyring file, or the JSON in an environment
// variable, before it is parsed.
const MaxKeyringSize = 1 << 20

type fileKeyring struct {
	ID      string    `json:"id"`
	Primary uint32    `json:"primary"`
	Keys    []fileKey `json:"keys"`
}

type fileKey struct {
	Version uint32          `json:"version"`
	Key     json.RawMessage `json:"key"` // decoded by hand, so errors name the version and the bytes can be cleared
	Created *time.Time      `json:"created"`
	Retired bool            `json:"retired"`
}

// parseKeyring builds a provider from keyring JSON. Its errors name what is
// wrong (and the version concerned) but never quote key material.
func parseKeyring(data []byte) (*Provider, error) {
	if len(data) > MaxKeyringSize {
		return nil, fmt.Errorf("keyring is %d bytes, limit %d", len(data), MaxKeyringSize)
	}
	if err := checkJSONShape(data); err != nil {
		return nil, err
	}
	var kf fileKeyring
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(&kf)
	defer func() {
		for _, k := range kf.Keys {
			provider.Clear(k.Key)
		}
	}()
	if err != nil {
		return nil, jsonError(err)
	}
	if err := checkID(kf.ID); err != nil {
		return nil, err
	}
	if len(kf.Keys) == 0 {
		return nil, errors.New("keyring has no keys")
	}
	versions := make(map[uint32]*keyVersion, len(kf.Keys))
	ok := false
	defer func() {
		if !ok {
			for _, v := range versions {
				provider.Clear(v.key)
			}
		}
	}()
	for _, k := range kf.Keys {
		if k.Version == 0 {
			return nil, errors.New("a key has no version or version 0; versions start at 1")
		}
		if versions[k.Version] != nil {
			return nil, fmt.Errorf("version %d appears twice", k.Version)
		}
		var created time.Time
		if k.Created != nil {
			created = *k.Created
		}
		if k.Retired {
			if len(k.Key) != 0 && string(k.Key) != "null" {
				return nil, fmt.Errorf("version %d is retired but still has a key; remove its key field", k.Version)
			}
			versions[k.Version] = &keyVersion{n: k.Version, created: created}
			continue
		}
		key, err := decodeKey(k.Version, k.Key)
		if err != nil {
			return nil, err
		}
		v, err := newKeyVersion(k.Version, key, created)
		if err != nil {
			provider.Clear(key)
			return nil, err
		}
		versions[k.Version] = v
	}
	switch pv := versions[kf.Primary]; {
	case kf.Primary == 0:
		return nil, errors.New("keyring names no primary version")
	case pv == nil:
		return nil, fmt.Errorf("primary version %d is not in the keyring", kf.Primary)
	case pv.retired():
		return nil, fmt.Errorf("primary version %d is retired", kf.Primary)
	}
	ok = true
	return newProvider(kf.ID, kf.Primary, versions), nil
}

func decodeKey(n uint32, raw json.RawMessage) ([]byte, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, fmt.Errorf("version %d has no key", n)
	}
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return nil, fmt.Errorf("version %d: key is not a base64 string", n)
	}
	enc := raw[1 : len(raw)-1]
	key := make([]byte, base64.StdEncoding.DecodedLen(len(enc)))
	m, err := base64.StdEncoding.Decode(key, enc)
	if err != nil {
		provider.Clear(key)
		return nil, fmt.Errorf("version %d: key is not valid standard base64", n)
	}
	if m != KeySize {
		provider.Clear(key)
		return nil, fmt.Errorf("version %d: key is %d bytes, want %d", n, m, KeySize)
	}
	return key[:m:m], nil
}

// maxDepth bounds JSON nesting; a keyring needs three levels.
const maxDepth = 8

// The member names of the keyring object and of each entry of its keys
// array, as their json tags spell them.
var (
	keyringFields = jsonNames[fileKeyring]()
	keyFields     = jsonNames[fileKey]()
)

func jsonNames[T any]() []string {
	t := reflect.TypeFor[T]()
	names := make([]string, t.NumField())
	for i := range names {
		names[i], _, _ = strings.Cut(t.Field(i).Tag.Get("json"), ",")
	}
	return names
}

// checkJSONShape requires exactly one JSON object, no duplicate member
// names at any depth, and member names of the keyring object and its key
// entries spelled exactly as the format does. encoding/json would silently
// keep the last of two "primary" members, and it matches names without
// regard to case ("ID", "KEY", or "\u212aey" with a Kelvin sign, fill "id"
// and "key"), where other JSON readers see another field; so a name that
// differs from a field only in case is refused, as a duplicate if the
// field is also present.
func checkJSONShape(data []byte) error {
	type frame struct {
		names      map[string]bool // nil for arrays
		fields     []string        // the names this object may have; nil if not checked here
		member     string          // the member name whose value this is; "" at top level or in an array
		expectName bool
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var stack []*frame
	var pending string // the member name whose value comes next
	valueDone := func() {
		if len(stack) > 0 && stack[len(stack)-1].names != nil {
			stack[len(stack)-1].expectName = true
		}
	}
	first := true
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if first {
				return errors.New("keyring is empty")
			}
			return nil
		}
		if err != nil {
			return jsonError(err)
		}
		if len(stack) == 0 && !first {
			return fmt.Errorf("unexpected data after the keyring object at byte %d", dec.InputOffset())
		}
		if first && tok != json.Delim('{') {
			return errors.New("keyring must be a JSON object")
		}
		first = false
		switch t := tok.(type) {
		case json.Delim:
			if t == '}' || t == ']' {
				stack = stack[:len(stack)-1]
				continue
			}
			if len(stack) >= maxDepth {
				return errors.New("keyring JSON is nested too deeply")
			}
			f := &frame{}
			if len(stack) > 0 && stack[len(stack)-1].names != nil {
				f.member = pending
			}
			valueDone()
			if t == '{' {
				f.names, f.expectName = map[string]bool{}, true
				switch {
				case len(stack) == 0:
					f.fields = keyringFields
				case len(stack) == 2 && stack[1].member == "keys":
					f.fields = keyFields
				}
			}
			stack = append(stack, f)
		case string:
			if top := stack[len(stack)-1]; top.names != nil && top.expectName {
				if top.names[t] {
					return fmt.Errorf("duplicate field %s", fieldName(t))
				}
				if err := checkSpelling(t, top.fields, top.names); err != nil {
					return err
				}
				top.names[t] = true
				top.expectName = false
				pending = t
				continue
			}
			valueDone()
		default:
			valueDone()
		}
	}
}

// checkSpelling refuses name when it is not one of fields but equals one
// of them apart from case. Names that match no field are left to the
// decoder, which reports them as unknown.
func checkSpelling(name string, fields []string, seen map[string]bool) error {
	if slices.Contains(fields, name) {
		return nil
	}
	for _, f := range fields {
		if strings.EqualFold(name, f) {
			if seen[f] {
				return fmt.Errorf("duplicate field %q (also spelled %s; field names are case-sensitive)", f, fieldName(name))
			}
			return fmt.Errorf("field %s must be spelled %q: field names are case-sensitive", fieldName(name), f)
		}
	}
	return nil
}

var fieldNameRE = regexp.MustCompile(`^[A-Za-z0-9_.]{1,32}$`)

// fieldName quotes a member name for an error only when it looks like a
// field name; anything else could be misplaced key material.
func fieldName(s string) string {
	if fieldNameRE.MatchString(s) {
		return strconv.Quote(s)
	}
	return "(name not shown)"
}

// jsonError turns an encoding/json error into one that cannot quote input.
func jsonError(err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	var pe *time.ParseError
	switch {
	case errors.As(err, &se):
		return fmt.Errorf("malformed JSON at byte %d", se.Offset)
	case errors.As(err, &te) && te.Field == "":
		return errors.New("keyring must be a JSON object")
	case errors.As(err, &te):
		return fmt.Errorf("field %s has the wrong type or is out of range", fieldName(te.Field))
	case errors.As(err, &pe):
		return errors.New("a created timestamp is not RFC 3339")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("malformed JSON: unexpected end")
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		if s, qerr := strconv.Unquote(name); qerr == nil {
			return fmt.Errorf("unknown field %s", fieldName(s))
		}
		return errors.New("unknown field")
	}
	return errors.New("malformed JSON")
}

// encode renders the keyring as JSON into a buffer sized up front, so no
// growth leaves copies of key bytes behind. The caller clears the result.
func (p *Provider) encode(primary uint32, vs map[uint32]*keyVersion) []byte {
	b := make([]byte, 0, 128+len(p.id)+256*len(vs))
	b = append(b, "{\n  \"id\": "...)
	b = strconv.AppendQuote(b, p.id) // id is restricted to characters JSON needs no escape for
	b = append(b, ",\n  \"primary\": "...)
	b = strconv.AppendUint(b, uint64(primary), 10)
	b = append(b, ",\n  \"keys\": ["...)
	for i, n := range sortedVersions(vs) {
		v := vs[n]
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, "\n    {\"version\": "...)
		b = strconv.AppendUint(b, uint64(n), 10)
		if !v.retired() {
			b = append(b, ", \"key\": \""...)
			b = base64.StdEncoding.AppendEncode(b, v.key)
			b = append(b, '"')
		}
		if !v.created.IsZero() {
			b = append(b, ", \"created\": \""...)
			b = v.created.AppendFormat(b, time.RFC3339Nano)
			b = append(b, '"')
		}
		b = append(b, ", \"retired\": "...)
		b = strconv.AppendBool(b, v.retired())
		b = append(b, '}')
	}
	b = append(b, "\n  ]\n}\n"...)
	return b
}

// OpenFile loads the keyring file at path (format in the package doc).
// It refuses a file that is not a regular file, is accessible by group or
// others (mode & 0o077 != 0), exceeds MaxKeyringSize, or is malformed.
// The result follows the file (see the package doc): Rotate and Retire
// rewrite it (symbolic links resolved) atomically under a lock, and every
// call re-reads it once another process has changed it. When the lock file
// beside the keyring can be created, OpenFile takes the lock and removes
// temporary files a crashed writer left behind.
func OpenFile(path string) (*Provider, error) {
	src, err := filepath.Abs(path)
	if err != nil {
		return nil, fileErr("open", path, err)
	}
	real, err := filepath.EvalSymlinks(src)
	if err != nil {
		return nil, fileErr("open", path, err)
	}
	// A directory the process cannot write to holds no files it could
	// have left behind, so open goes on without the lock there.
	if unlock, err := lockKeyring(real); err == nil {
		defer unlock()
		if err := removeTemps(real); err != nil {
			return nil, fileErr("open", path, err)
		}
	}
	data, id, err := readKeyringFile(real)
	if err != nil {
		return nil, fileErr("open", path, err)
	}
	defer provider.Clear(data)
	p, err := parseKeyring(data)
	if err != nil {
		return nil, fileErr("open", path, err)
	}
	p.path, p.src = real, src
	p.fileSum = sha256.Sum256(data)
	p.seen = id
	return p, nil
}

func fileErr(op, path string, err error) error {
	if pe, ok := err.(*fs.PathError); ok {
		err = pe.Err // the path is already in the message
	}
	var kind error
	if errors.Is(err, fs.ErrNotExist) {
		kind = provider.ErrKeyNotFound
	}
	return opErr(op, kind, fmt.Errorf("keyring file %s: %w", path, err))
}

// readKeyringFile reads path after checking that it is a private regular
// file no larger than MaxKeyringSize, and returns the identity of the file
// it read.
func readKeyringFile(path string) ([]byte, fileID, error) {
	// Stat first so a FIFO or device is refused before open could block on it.
	st, err := os.Stat(path)
	if err != nil {
		return nil, fileID{}, err
	}
	if !st.Mode().IsRegular() {
		return nil, fileID{}, errors.New("not a regular file")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fileID{}, err
	}
	defer f.Close()
	if st, err = f.Stat(); err != nil {
		return nil, fileID{}, err
	}
	id := fileIDOf(f)
	if !st.Mode().IsRegular() {
		return nil, id, errors.New("not a regular file")
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, id, fmt.Errorf("accessible by group or others (mode %04o); chmod 600 it", perm)
	}
	if st.Size() > MaxKeyringSize {
		return nil, id, fmt.Errorf("file is %d bytes, limit %d", st.Size(), MaxKeyringSize)
	}
	// Allocate for the limit so a file growing during the read cannot make
	// the buffer regrow and leave a stale copy of the keys.
	data := make([]byte, 0, MaxKeyringSize+1)
	n, err := io.ReadFull(f, data[:MaxKeyringSize+1])
	if err != io.ErrUnexpectedEOF && err != io.EOF {
		provider.Clear(data[:n])
		if err == nil {
			return nil, id, fmt.Errorf("file is over %d bytes", MaxKeyringSize)
		}
		return nil, id, err
	}
	return data[:n], id, nil
}

// lockName and tempPrefix name the files keybroker keeps beside a keyring
// file: the lock that writers hold, which is empty, and the temporary
// files a write goes through.
func lockName(keyring string) string {
	return filepath.Join(filepath.Dir(keyring), "."+filepath.Base(keyring)+".lock")
}

func tempPrefix(keyring string) string { return "." + filepath.Base(keyring) + ".tmp-" }

// removeTemps removes the temporary files a writer killed mid-write left
// beside keyring; they may hold every key the keyring had. The caller
// holds the keyring's lock, so no live writer's file is among them.
func removeTemps(keyring string) error {
	dir, prefix := filepath.Dir(keyring), tempPrefix(keyring)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) || !e.Type().IsRegular() {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("removing a leftover temporary file: %w", err)
		}
	}
	return nil
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)

// FromEnv loads a keyring from the environment variable name. The value is
// the keyring JSON itself, or that JSON in standard base64 (line breaks
// allowed). The result is read-only: Rotate and Retire return ErrReadOnly.
func FromEnv(name string) (*Provider, error) {
	if !envNameRE.MatchString(name) {
		return nil, opErr("open", nil, errors.New("malformed environment variable name"))
	}
	val, ok := os.LookupEnv(name)
	if !ok {
		return nil, opErr("open", provider.ErrKeyNotFound, fmt.Errorf("environment variable %s is not set", name))
	}
	p, err := parseEnv(val)
	if err != nil {
		return nil, opErr("open", nil, fmt.Errorf("environment variable %s: %w", name, err))
	}
	p.envName = name
	return p, nil
}

func parseEnv(val string) (*Provider, error) {
	s := strings.TrimSpace(val)
	if s == "" {
		return nil, errors.New("empty")
	}
	if len(s) > 2*MaxKeyringSize {
		return nil, fmt.Errorf("value is %d bytes, limit %d", len(s), 2*MaxKeyringSize)
	}
	var data []byte
	if s[0] == '{' {
		data = []byte(s)
	} else {
		data = make([]byte, base64.StdEncoding.DecodedLen(len(s)))
		n, err := base64.StdEncoding.Decode(data, []byte(s))
		if err != nil {
			provider.Clear(data)
			return nil, errors.New("value is neither keyring JSON nor standard base64 of it")
		}
		data = data[:n]
	}
	defer provider.Clear(data)
	return parseKeyring(data)
}

// Save writes the keyring to a new file at path with mode 0600: written to
// a temporary file in the same directory, synced, then linked into place,
// so path either does not exist or holds the whole keyring. It refuses to
// overwrite an existing file, which would destroy the keys in it. Like
// Rotate and Retire it holds the lock beside path while it writes. Save
// does not make p file-backed: later Rotate and Retire calls do not update
// path.
func (p *Provider) Save(path string) error {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	unlock, err := lockKeyring(path)
	if err != nil {
		return fileErr("save", path, err)
	}
	defer unlock()
	if err := removeTemps(path); err != nil {
		return fileErr("save", path, err)
	}
	data := p.encode(p.primary, p.versions)
	defer provider.Clear(data)
	err = writeFileAtomic(path, data, func(tmp string) error {
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return errors.New("file exists; refusing to overwrite a keyring")
			}
			return err
		}
		return os.Remove(tmp)
	})
	if err != nil {
		return fileErr("save", path, err)
	}
	return nil
}

// lockForWrite takes the keyring file's lock, removes leftover temporary
// files and re-reads the file, so that a change builds on what the file
// holds now, including changes other processes made. The caller holds
// writeMu and calls the returned func when done.
func (p *Provider) lockForWrite(op string) (unlock func(), err error) {
	// Writing through a re-pointed link would update a file nobody reads.
	real, err := filepath.EvalSymlinks(p.src)
	if err != nil {
		return nil, fileErr(op, p.src, err)
	}
	if real != p.path {
		return nil, fileErr(op, p.src, fmt.Errorf("now resolves to %s, not %s as when opened; reopen it", real, p.path))
	}
	unlock, err = lockKeyring(p.path)
	if err != nil {
		return nil, fileErr(op, p.path, err)
	}
	if err := removeTemps(p.path); err != nil {
		unlock()
		return nil, fileErr(op, p.path, err)
	}
	if err := p.reload(); err != nil {
		unlock()
		return nil, fileErr(op, p.path, err)
	}
	return unlock, nil
}

// persist writes the keyring, with changed added or replacing its version
// and primary as given, to p's file if it has one, and returns the new
// file's identity. It refuses when the file no longer holds what p last
// read: someone wrote it without taking the lock. Caller holds writeMu and
// the lock (lockForWrite).
func (p *Provider) persist(op string, primary uint32, changed *keyVersion) (fileID, error) {
	if p.path == "" {
		return fileID{}, nil
	}
	next := make(map[uint32]*keyVersion, len(p.versions)+1)
	for n, v := range p.versions {
		next[n] = v
	}
	next[changed.n] = changed
	data := p.encode(primary, next)
	defer provider.Clear(data)

	cur, _, err := readKeyringFile(p.path)
	if err != nil {
		return fileID{}, fileErr(op, p.path, err)
	}
	curSum := sha256.Sum256(cur)
	provider.Clear(cur)
	if subtle.ConstantTimeCompare(curSum[:], p.fileSum[:]) != 1 {
		return fileID{}, fileErr(op, p.path, ErrKeyringChanged)
	}
	err = writeFileAtomic(p.path, data, func(tmp string) error { return os.Rename(tmp, p.path) })
	if err != nil {
		return fileID{}, fileErr(op, p.path, err)
	}
	p.fileSum = sha256.Sum256(data)
	return statID(p.path), nil
}

// writeFileAtomic writes data to a 0600 temporary file beside path, syncs
// it, calls install to move it into place, and syncs the directory. The
// temporary file is removed if anything fails.
func writeFileAtomic(path string, data []byte, install func(tmp string) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPrefix(path)+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(0o600); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = install(tmp); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
