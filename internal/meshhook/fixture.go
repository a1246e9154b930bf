package meshhook

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/internal/testbin"
)

// fixtureScript generates the fixture; see its header for the output.
//
//go:embed fixture.mjs
var fixtureScript []byte

// Kind says what a fixture row's stored value is.
type Kind string

const (
	// KindPlain: an ordinary plaintext, stored as is.
	KindPlain Kind = "plain"
	// KindLookalike: a plaintext starting with "v1:" without a well-formed
	// v1 header (wrong IV or tag length, bad base64, missing fields),
	// stored as is; a v1 decoder must not claim it.
	KindLookalike Kind = "lookalike"
	// KindV1: MeshHook's v1:<iv>:<tag>:<ct> ciphertext of Plaintext.
	KindV1 Kind = "v1"
	// KindForged: a plaintext with a well-formed v1 header whose tag does
	// not verify, stored as is. legacy's v1 decoder claims and refuses it
	// (legacy's doc: "Look-alike plaintexts"), so a migration must stop on
	// it rather than guess.
	KindForged Kind = "forged"
)

// Options sizes a fixture. Counts are exact; the rows not V1, Lookalike or
// Forged are KindPlain.
type Options struct {
	Rows, Projects        int
	V1, Lookalike, Forged int
}

// Standard is issue 13's fixture: 20,000 rows over 50 projects, 40% v1
// values, 60% plaintext of which 1,200 look like v1 values. It has no
// forged rows, which legacy's decoders refuse by design; tests of that
// refusal ask for some.
func Standard() Options {
	return Options{Rows: 20000, Projects: 50, V1: 8000, Lookalike: 1200}
}

// Project is a row of MeshHook's projects table.
type Project struct {
	ID    string `json:"project"`
	Owner string `json:"owner"`
	Name  string `json:"name"`
}

// Row is a row of MeshHook's secrets table: Stored is value_encrypted,
// Plaintext what the application reads from it.
type Row struct {
	Project   string `json:"project"`
	Key       string `json:"key"`
	Stored    []byte `json:"stored"`
	Plaintext []byte `json:"plaintext"`
	Kind      Kind   `json:"kind"`
}

// Fixture is a generated data set: the projects, the rows, and the
// SECRETS_ENCRYPTION_KEY (64 hex characters) the v1 rows are sealed under.
type Fixture struct {
	KeyHex   string
	Projects []Project
	Rows     []Row
}

// Generate runs fixture.mjs with Node (testbin.Find("node"): Node 20+)
// under a fresh random key and returns its rows. The key reaches Node only
// through its environment.
func Generate(ctx context.Context, o Options) (*Fixture, error) {
	if o.Rows < 0 || o.Projects < 1 || o.V1 < 0 || o.Lookalike < 0 || o.Forged < 0 || o.V1+o.Lookalike+o.Forged > o.Rows {
		return nil, fmt.Errorf("meshhook: fixture options %+v do not fit", o)
	}
	node, err := testbin.Find("node")
	if err != nil {
		return nil, fmt.Errorf("meshhook: %w", err)
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("meshhook: key: %w", err)
	}
	f := &Fixture{KeyHex: hex.EncodeToString(raw[:])}
	cmd := exec.CommandContext(ctx, node, "--input-type=module", "-")
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"SECRETS_ENCRYPTION_KEY=" + f.KeyHex,
		"FIXTURE_ROWS=" + strconv.Itoa(o.Rows),
		"FIXTURE_PROJECTS=" + strconv.Itoa(o.Projects),
		"FIXTURE_V1=" + strconv.Itoa(o.V1),
		"FIXTURE_LOOKALIKE=" + strconv.Itoa(o.Lookalike),
		"FIXTURE_FORGED=" + strconv.Itoa(o.Forged),
	}
	cmd.Stdin = bytes.NewReader(fixtureScript)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("meshhook: node fixture.mjs: %w: %s", err, firstLine(stderr.Bytes()))
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(f.Projects) < o.Projects {
			var p Project
			if err := json.Unmarshal(line, &p); err != nil {
				return nil, fmt.Errorf("meshhook: fixture project line: %w", err)
			}
			f.Projects = append(f.Projects, p)
			continue
		}
		var r Row
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("meshhook: fixture row %d: %w", len(f.Rows), err)
		}
		f.Rows = append(f.Rows, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("meshhook: fixture output: %w", err)
	}
	if len(f.Projects) != o.Projects || len(f.Rows) != o.Rows {
		return nil, fmt.Errorf("meshhook: fixture has %d projects and %d rows, want %d and %d", len(f.Projects), len(f.Rows), o.Projects, o.Rows)
	}
	return f, nil
}

func firstLine(b []byte) string {
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// Count returns how many rows are of kind k.
func (f *Fixture) Count(k Kind) int {
	n := 0
	for _, r := range f.Rows {
		if r.Kind == k {
			n++
		}
	}
	return n
}

// Load copies the fixture into MeshHook's tables in schema (made by
// CreateSchema) with COPY, in one transaction when db is a pool or
// connection.
func Load(ctx context.Context, db DB, schema string, f *Fixture) error {
	if err := checkSchema(schema); err != nil {
		return err
	}
	projects := make([][]any, len(f.Projects))
	for i, p := range f.Projects {
		id, err := parseUUID(p.ID)
		if err != nil {
			return err
		}
		owner, err := parseUUID(p.Owner)
		if err != nil {
			return err
		}
		projects[i] = []any{id, owner, p.Name}
	}
	rows := make([][]any, len(f.Rows))
	for i, r := range f.Rows {
		id, err := parseUUID(r.Project)
		if err != nil {
			return err
		}
		rows[i] = []any{id, r.Key, r.Stored}
	}
	if _, err := db.CopyFrom(ctx, pgx.Identifier{schema, "projects"}, []string{"id", "owner", "name"}, pgx.CopyFromRows(projects)); err != nil {
		return fmt.Errorf("meshhook: copy projects: %w", err)
	}
	if _, err := db.CopyFrom(ctx, pgx.Identifier{schema, "secrets"}, []string{"project_id", "key", "value_encrypted"}, pgx.CopyFromRows(rows)); err != nil {
		return fmt.Errorf("meshhook: copy secrets: %w", err)
	}
	return nil
}

func parseUUID(s string) (pgtype.UUID, error) {
	var u pgtype.UUID
	if err := u.Scan(s); err != nil {
		return u, fmt.Errorf("meshhook: uuid %q: %w", s, err)
	}
	return u, nil
}

// RowKey names a secrets row by its unique (project_id, key).
type RowKey struct{ Project, Key string }

// Want is what a row may hold when checked: the SHA-256 of any one of
// Values (the last acknowledged write, and any write attempted after it
// whose outcome is unknown, such as one cut by SIGKILL), or no row at all
// when MayBeAbsent (a row only an unacknowledged write could have made).
// Refused marks a forged fixture row, which a v1 decoder must refuse.
type Want struct {
	Values      [][sha256.Size]byte
	MayBeAbsent bool
	Refused     bool
}

// Expected is what every row of the secrets table should decode to.
type Expected map[RowKey]*Want

// Expected returns the fixture's rows as expectations.
func (f *Fixture) Expected() Expected {
	e := make(Expected, len(f.Rows))
	for _, r := range f.Rows {
		e[RowKey{r.Project, r.Key}] = &Want{Values: [][sha256.Size]byte{sha256.Sum256(r.Plaintext)}, Refused: r.Kind == KindForged}
	}
	return e
}

// DropProject forgets every expectation of project (deleted on purpose).
func (e Expected) DropProject(project string) {
	for k := range e {
		if k.Project == project {
			delete(e, k)
		}
	}
}

// Opener decodes a stored value_encrypted of row (project, key) to the
// plaintext the application reads.
type Opener func(ctx context.Context, project, key string, stored []byte) ([]byte, error)

// Report counts the outcome of Check. It never holds values.
type Report struct {
	Rows       int // rows in the table
	Matched    int // decoded to an expected value (or refused as expected)
	Mismatched int // decoded to something else
	Failed     int // the Opener failed on a row that should decode
	Accepted   int // a forged row that decoded instead of being refused
	Missing    int // expected rows absent from the table
	Unexpected int // rows in the table nobody expected
	// Examples names up to 10 failing rows ("project/key: what"), never
	// their bytes.
	Examples []string
}

// OK reports whether every row matched and none is missing or unexpected.
func (r Report) OK() bool { return r.Rows == r.Matched && r.Missing == 0 && r.Unexpected == 0 }

func (r Report) String() string {
	return fmt.Sprintf("%d rows: %d matched, %d mismatched, %d failed to open, %d forged accepted, %d missing, %d unexpected; %v",
		r.Rows, r.Matched, r.Mismatched, r.Failed, r.Accepted, r.Missing, r.Unexpected, r.Examples)
}

func (r *Report) example(k RowKey, what string) {
	if len(r.Examples) < 10 {
		r.Examples = append(r.Examples, k.Project+"/"+k.Key+": "+what)
	}
}

// Check reads every row of schema.secrets, opens it with open and compares
// its SHA-256 with exp. Only a database error is an error; everything
// about the rows is in the Report.
func Check(ctx context.Context, db DB, schema string, exp Expected, open Opener) (Report, error) {
	var r Report
	if err := checkSchema(schema); err != nil {
		return r, err
	}
	rows, err := db.Query(ctx, `SELECT project_id::text, key, value_encrypted FROM `+pgx.Identifier{schema, "secrets"}.Sanitize())
	if err != nil {
		return r, fmt.Errorf("meshhook: check: %w", err)
	}
	seen := make(map[RowKey]bool, len(exp))
	var (
		k      RowKey
		stored []byte
	)
	_, err = pgx.ForEachRow(rows, []any{&k.Project, &k.Key, &stored}, func() error {
		r.Rows++
		seen[k] = true
		w := exp[k]
		if w == nil {
			r.Unexpected++
			r.example(k, "unexpected row")
			return nil
		}
		pt, err := open(ctx, k.Project, k.Key, stored)
		switch {
		case err != nil && w.Refused:
			r.Matched++
		case err != nil:
			r.Failed++
			r.example(k, "open failed")
		case w.Refused:
			r.Accepted++
			r.example(k, "forged value accepted")
		default:
			sum := sha256.Sum256(pt)
			clear(pt)
			for _, v := range w.Values {
				if v == sum {
					r.Matched++
					return nil
				}
			}
			r.Mismatched++
			r.example(k, "wrong value")
		}
		return nil
	})
	if err != nil {
		return r, fmt.Errorf("meshhook: check: %w", err)
	}
	for k, w := range exp {
		if !seen[k] && !w.MayBeAbsent {
			r.Missing++
			r.example(k, "missing")
		}
	}
	return r, nil
}
