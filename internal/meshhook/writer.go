package meshhook

import (
	"bufio"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	mrand "math/rand/v2"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgstore"
)

// Encoder turns a plaintext into the bytes the application stores in
// secrets.value_encrypted for row (project, key). Encode runs inside the
// write's transaction, tx, so an encoder that keeps state in the database
// (keybroker's sealed values, whose data keys live in data_keys) commits
// or rolls back with the row.
type Encoder interface {
	Encode(ctx context.Context, tx pgx.Tx, project, key string, plaintext []byte) ([]byte, error)
}

// EncoderEnv is what an EncoderFactory may use: the writer's pool, the
// schema holding MeshHook's tables, and the environment (for keys and
// provider URLs; never logged).
type EncoderEnv struct {
	Pool   *pgxpool.Pool
	Schema string
	Getenv func(string) string
}

// EncoderFactory makes an Encoder; see RegisterEncoder.
type EncoderFactory func(ctx context.Context, env EncoderEnv) (Encoder, error)

var (
	encodersMu sync.Mutex
	encoders   = map[string]EncoderFactory{
		// The application before keybroker: MeshHook's v1 values under
		// SECRETS_ENCRYPTION_KEY.
		"v1": func(_ context.Context, env EncoderEnv) (Encoder, error) {
			key, err := legacy.ParseMeshHookKey(env.Getenv("SECRETS_ENCRYPTION_KEY"))
			if err != nil {
				return nil, fmt.Errorf("meshhook: SECRETS_ENCRYPTION_KEY: %w", err)
			}
			defer clear(key)
			return NewV1Encoder(key)
		},
		// The oldest application: plaintext in value_encrypted.
		"plaintext": func(context.Context, EncoderEnv) (Encoder, error) { return PlaintextEncoder{}, nil },
	}
)

// RegisterEncoder makes an encoder available by name to NewEncoder (and so
// to appwriter's -mode). It is how keybroker's sealed values join the
// writer: a file registering "sealed" in an init function. Registering a
// name twice panics.
func RegisterEncoder(name string, f EncoderFactory) {
	encodersMu.Lock()
	defer encodersMu.Unlock()
	if _, dup := encoders[name]; dup || f == nil {
		panic("meshhook: RegisterEncoder " + name + ": duplicate or nil")
	}
	encoders[name] = f
}

// EncoderNames lists the registered encoders, sorted.
func EncoderNames() []string {
	encodersMu.Lock()
	defer encodersMu.Unlock()
	names := make([]string, 0, len(encoders))
	for n := range encoders {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// NewEncoder makes the encoder registered as name.
func NewEncoder(ctx context.Context, name string, env EncoderEnv) (Encoder, error) {
	encodersMu.Lock()
	f := encoders[name]
	encodersMu.Unlock()
	if f == nil {
		return nil, fmt.Errorf("meshhook: no encoder %q (have %v)", name, EncoderNames())
	}
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	return f(ctx, env)
}

// PlaintextEncoder stores the plaintext itself, as MeshHook's oldest
// version did.
type PlaintextEncoder struct{}

// Encode implements Encoder.
func (PlaintextEncoder) Encode(_ context.Context, _ pgx.Tx, _, _ string, plaintext []byte) ([]byte, error) {
	return slices.Clone(plaintext), nil
}

// V1Encoder writes MeshHook's v1 values: the UTF-8 text
// v1:<iv>:<tag>:<ct>, standard base64 each, AES-256-GCM with a random
// 12-byte IV, 16-byte tag and no associated data.
type V1Encoder struct{ aead cipher.AEAD }

// NewV1Encoder returns a V1Encoder under the 32-byte key.
func NewV1Encoder(key []byte) (*V1Encoder, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("meshhook: v1 key is %d bytes, want 32", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("meshhook: %w", err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		return nil, fmt.Errorf("meshhook: %w", err)
	}
	return &V1Encoder{aead: a}, nil
}

// Encode implements Encoder.
func (e *V1Encoder) Encode(_ context.Context, _ pgx.Tx, _, _ string, plaintext []byte) ([]byte, error) {
	iv := make([]byte, e.aead.NonceSize())
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("meshhook: iv: %w", err)
	}
	sealed := e.aead.Seal(nil, iv, plaintext, nil)
	ct, tag := sealed[:len(sealed)-e.aead.Overhead()], sealed[len(sealed)-e.aead.Overhead():]
	b64 := base64.StdEncoding.EncodeToString
	return []byte("v1:" + b64(iv) + ":" + b64(tag) + ":" + b64(ct)), nil
}

// WriterConfig configures RunWriter.
type WriterConfig struct {
	Pool    *pgxpool.Pool
	Schema  string // holding MeshHook's tables
	Encoder Encoder
	// Log receives one JSON line per write attempt ("try", before its
	// transaction) and per acknowledged write ("ack", after its commit):
	// {"op", "project", "key", "sha256"} with the plaintext's hash, never
	// the plaintext. Each line is one Write call, so on an *os.File a
	// SIGKILL loses no acknowledged line. Required.
	Log io.Writer
	// Worker of Workers: this writer updates the fixture rows whose
	// (project, key) hashes to Worker modulo Workers, and inserts rows of
	// its own (keys "app_w<Worker>_<n>"), so writers never share a row.
	Worker, Workers int
	// Ops stops the writer after that many acknowledged writes (0: until
	// ctx ends). NewEvery makes every NewEvery-th write an insert of a new
	// key (0: never).
	Ops      int64
	NewEvery int
	Seed     uint64
}

// WriterSummary is what RunWriter did.
type WriterSummary struct {
	Worker       int   `json:"worker"`
	Acked        int64 `json:"acked"`
	Inserts      int64 `json:"inserts"`
	Failed       int64 `json:"failed"`        // writes that returned an error (not acknowledged)
	ProjectsGone int   `json:"projects_gone"` // projects deleted under the writer
}

type logLine struct {
	Op      string `json:"op"`
	Project string `json:"project"`
	Key     string `json:"key"`
	SHA256  string `json:"sha256"`
}

// RunWriter writes secrets rows as MeshHook does, one transaction per
// write (encode, then INSERT ... ON CONFLICT (project_id, key) DO UPDATE),
// until Ops acknowledged writes or ctx ends (then it returns its summary
// and no error). A project deleted under it (the insert's foreign key
// fails) is dropped from its choice; any other failed write is counted and
// the writer goes on. A project whose keybroker data keys refuse the
// write (pgstore.ErrProjectShredded) is dropped likewise.
func RunWriter(ctx context.Context, cfg WriterConfig) (WriterSummary, error) {
	sum := WriterSummary{Worker: cfg.Worker}
	if cfg.Pool == nil || cfg.Encoder == nil || cfg.Log == nil || cfg.Workers < 1 || cfg.Worker < 0 || cfg.Worker >= cfg.Workers {
		return sum, errors.New("meshhook: RunWriter needs Pool, Encoder, Log and 0 <= Worker < Workers")
	}
	if err := checkSchema(cfg.Schema); err != nil {
		return sum, err
	}
	t := func(name string) string { return pgx.Identifier{cfg.Schema, name}.Sanitize() }
	var projects []string
	rows, err := cfg.Pool.Query(ctx, `SELECT id::text FROM `+t("projects")+` ORDER BY id`)
	if err == nil {
		projects, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		return sum, fmt.Errorf("meshhook: writer: list projects: %w", err)
	}
	var owned []RowKey
	rows, err = cfg.Pool.Query(ctx, `SELECT project_id::text, key FROM `+t("secrets")+` ORDER BY project_id, key`)
	if err == nil {
		owned, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (RowKey, error) {
			var k RowKey
			err := r.Scan(&k.Project, &k.Key)
			return k, err
		})
	}
	if err != nil {
		return sum, fmt.Errorf("meshhook: writer: list secrets: %w", err)
	}
	owned = slices.DeleteFunc(owned, func(k RowKey) bool { return !ownedBy(k, cfg.Worker, cfg.Workers) })
	gone := map[string]bool{}
	rng := mrand.New(mrand.NewPCG(cfg.Seed, uint64(cfg.Worker)))
	upsert := `INSERT INTO ` + t("secrets") + ` (project_id, key, value_encrypted) VALUES ($1, $2, $3)
ON CONFLICT (project_id, key) DO UPDATE SET value_encrypted = EXCLUDED.value_encrypted, updated_at = now()`
	for seq := int64(0); cfg.Ops == 0 || sum.Acked < cfg.Ops; seq++ {
		if ctx.Err() != nil {
			return sum, nil
		}
		var k RowKey
		if live := len(projects) - len(gone); live == 0 {
			return sum, nil
		}
		if len(owned) == 0 || cfg.NewEvery > 0 && seq%int64(cfg.NewEvery) == 0 {
			p := projects[rng.IntN(len(projects))]
			if gone[p] {
				continue
			}
			k = RowKey{p, fmt.Sprintf("app_w%d_%d", cfg.Worker, seq)}
			sum.Inserts++
			owned = append(owned, k)
		} else if k = owned[rng.IntN(len(owned))]; gone[k.Project] {
			continue
		}
		pt := make([]byte, 8+rng.IntN(120))
		for i := range pt {
			pt[i] = byte(' ' + rng.IntN(95))
		}
		h := sha256.Sum256(pt)
		line := logLine{Project: k.Project, Key: k.Key, SHA256: hex.EncodeToString(h[:])}
		if err := writeLog(cfg.Log, "try", line); err != nil {
			return sum, err
		}
		err := pgx.BeginFunc(ctx, cfg.Pool, func(tx pgx.Tx) error {
			stored, err := cfg.Encoder.Encode(ctx, tx, k.Project, k.Key, pt)
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, upsert, k.Project, k.Key, stored)
			return err
		})
		clear(pt)
		var pe *pgconn.PgError
		switch {
		case err == nil:
			sum.Acked++
			if err := writeLog(cfg.Log, "ack", line); err != nil {
				return sum, err
			}
		case ctx.Err() != nil:
			return sum, nil
		case errors.As(err, &pe) && pe.Code == "23503", // foreign key: the project is gone
			errors.Is(err, pgstore.ErrProjectShredded):
			gone[k.Project] = true
			sum.ProjectsGone = len(gone)
			sum.Failed++
		default:
			sum.Failed++
		}
	}
	return sum, nil
}

// ownedBy reports whether writer worker of workers may write row k: a row
// a writer inserted (key "app_w<n>_...") belongs to that writer, any other
// row to the writer its hash names. Writers start at different times, so a
// writer listing the table may already see another's rows.
func ownedBy(k RowKey, worker, workers int) bool {
	if strings.HasPrefix(k.Key, "app_w") {
		return strings.HasPrefix(k.Key, fmt.Sprintf("app_w%d_", worker))
	}
	h := fnv.New64a()
	h.Write([]byte(k.Project))
	h.Write([]byte{0})
	h.Write([]byte(k.Key))
	return h.Sum64()%uint64(workers) == uint64(worker)
}

func writeLog(w io.Writer, op string, l logLine) error {
	l.Op = op
	b, err := json.Marshal(l)
	if err != nil {
		return fmt.Errorf("meshhook: writer log: %w", err)
	}
	if _, err := w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("meshhook: writer log: %w", err)
	}
	return nil
}

// ApplyLog updates e with a writer's log (WriterConfig.Log): a row's
// acknowledged write replaces what the row may hold, and attempts after
// the last acknowledgement (their outcome unknown: the writer may have
// been killed before or after its commit) are accepted as well. A row
// that only unacknowledged writes could have made may be absent.
func (e Expected) ApplyLog(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		var l logLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			// A writer killed mid-line leaves a torn last line: its write
			// was only attempted, and attempts change nothing below
			// unless they parse.
			continue
		}
		raw, err := hex.DecodeString(l.SHA256)
		if err != nil || len(raw) != sha256.Size {
			return fmt.Errorf("meshhook: writer log line %d: bad sha256", n)
		}
		h := [sha256.Size]byte(raw)
		k := RowKey{l.Project, l.Key}
		w := e[k]
		if w == nil {
			w = &Want{MayBeAbsent: true}
			e[k] = w
		}
		switch l.Op {
		case "try":
			w.Values = append(w.Values, h)
		case "ack":
			w.Values, w.MayBeAbsent, w.Refused = [][sha256.Size]byte{h}, false, false
		default:
			return fmt.Errorf("meshhook: writer log line %d: op %q", n, l.Op)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("meshhook: writer log: %w", err)
	}
	return nil
}

// ApplyLogFile is ApplyLog of the file at path.
func (e Expected) ApplyLogFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("meshhook: %w", err)
	}
	defer f.Close()
	return e.ApplyLog(f)
}

// LegacyOpener opens values as MeshHook's current application reads them:
// a v1 value under keyHex (legacy.MeshHookV1), anything else as plaintext.
// The caller closes the returned io.Closer (it clears the key).
func LegacyOpener(keyHex string) (Opener, io.Closer, error) {
	key, err := legacy.ParseMeshHookKey(keyHex)
	if err != nil {
		return nil, nil, fmt.Errorf("meshhook: %w", err)
	}
	d, err := legacy.MeshHookV1(key)
	if err != nil {
		return nil, nil, fmt.Errorf("meshhook: %w", err)
	}
	chain, err := legacy.NewChain(d, legacy.Plaintext())
	if err != nil {
		d.Close()
		return nil, nil, fmt.Errorf("meshhook: %w", err)
	}
	open := func(_ context.Context, _, _ string, stored []byte) ([]byte, error) {
		pt, _, err := chain.Decode(stored)
		return pt, err
	}
	return open, chain, nil
}
