package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
)

// Op is an operation a token may be allowed.
type Op string

// The operations. Read covers get, get-many and list; write covers put and
// delete of a secret; admin covers deleting a whole project.
const (
	OpRead  Op = "read"
	OpWrite Op = "write"
	OpSeal  Op = "seal"
	OpOpen  Op = "open"
	OpAdmin Op = "admin"
)

// AllOps lists every operation, in a fixed order.
var AllOps = []Op{OpRead, OpWrite, OpSeal, OpOpen, OpAdmin}

func (o Op) bit() uint8 {
	if i := slices.Index(AllOps, o); i >= 0 {
		return 1 << i
	}
	return 0
}

// Bounds on tokens.
const (
	TokenPrefix      = "kbt_"                    // every token starts with it
	MaxTokenTTL      = 10 * 366 * 24 * time.Hour // longest lifetime Create accepts
	MaxTokenNameLen  = 256                       // bytes of TokenSpec.Name
	MaxTokenProjects = 1000                      // entries of TokenSpec.Projects
	tokenIDLen       = 16
	tokenSecretLen   = 32 // 256 random bits
	// tokenLen is the length of a token string: the prefix and the
	// unpadded base64url of id and secret.
	tokenLen = len(TokenPrefix) + (8*(tokenIDLen+tokenSecretLen)+5)/6
)

// TokenSpec says what a new token may do.
type TokenSpec struct {
	// Name describes the token (who holds it); 1 to MaxTokenNameLen bytes
	// of UTF-8. Not unique.
	Name string
	// Projects the token may act on; empty for every project.
	Projects []string
	// Ops the token may perform; at least one.
	Ops []Op
	// TTL is how long the token is valid, more than 0 and at most
	// MaxTokenTTL.
	TTL time.Duration
	// ClientCertSHA256, when not nil, binds the token to one client
	// certificate: the SHA-256 of its DER (ClientCertFingerprint computes
	// it from a PEM file), exactly 32 bytes. The server then accepts the
	// token only on a TLS connection whose verified leaf certificate
	// hashes to it, so it needs mTLS (Options.ClientCAFile); anywhere
	// else the token gets the 401 of a bad token. Nil: the token alone
	// is the identity.
	ClientCertSHA256 []byte
}

// ClientCertPrefixLen is how many hex digits of a bound token's
// certificate fingerprint TokenInfo shows.
const ClientCertPrefixLen = 16

// ClientCertFingerprint returns the SHA-256 of the DER of the one
// certificate in pemData: the value TokenSpec.ClientCertSHA256 binds a
// token to, and what the server computes from a connection's verified
// leaf certificate. pemData must hold exactly one PEM block, of type
// CERTIFICATE, that parses as an X.509 certificate (the client's leaf, not
// a chain: a chain would leave which certificate is meant to a guess);
// anything else is ErrInvalidArgument.
func ClientCertFingerprint(pemData []byte) ([]byte, error) {
	block, rest := pem.Decode(pemData)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: client certificate: no PEM CERTIFICATE block", ErrInvalidArgument)
	}
	if next, _ := pem.Decode(rest); next != nil {
		return nil, fmt.Errorf("%w: client certificate: more than one PEM block; give the client's own certificate only", ErrInvalidArgument)
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return nil, fmt.Errorf("%w: client certificate: not an X.509 certificate", ErrInvalidArgument)
	}
	h := sha256.Sum256(block.Bytes)
	return h[:], nil
}

// TokenInfo describes a stored token. It never carries the token or its
// hash.
type TokenInfo struct {
	ID        string     `json:"id"` // 32 hex digits, not secret
	Name      string     `json:"name"`
	Projects  []string   `json:"projects"` // nil: every project
	Ops       []Op       `json:"operations"`
	CreatedAt time.Time  `json:"created_at"`
	ExpiresAt time.Time  `json:"expires_at"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// ClientCertPrefix is, for a token bound to a client certificate, the
	// first ClientCertPrefixLen hex digits of the certificate's SHA-256
	// (enough to tell which certificate; compare with `openssl x509
	// -noout -fingerprint -sha256`); empty for an unbound token.
	ClientCertPrefix string `json:"client_cert_sha256_prefix,omitempty"`
}

// Tokens manages the service tokens of one keybroker schema (table
// service_tokens, created by pgstore.Migrate). It needs no KEK.
type Tokens struct {
	pool *pgxpool.Pool
	q    string // quoted schema
}

var schemaRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// NewTokens returns the token table of schema (pgstore.DefaultSchema when
// empty) on pool.
func NewTokens(pool *pgxpool.Pool, schema string) (*Tokens, error) {
	if pool == nil {
		return nil, fmt.Errorf("%w: nil pool", ErrInvalidArgument)
	}
	if schema == "" {
		schema = pgstore.DefaultSchema
	}
	if !schemaRE.MatchString(schema) {
		return nil, fmt.Errorf("%w: schema name %q: want lower-case letters, digits and underscores", ErrInvalidArgument, schema)
	}
	return &Tokens{pool: pool, q: pgx.Identifier{schema}.Sanitize()}, nil
}

func checkSpec(spec TokenSpec) error {
	switch {
	case spec.Name == "" || len(spec.Name) > MaxTokenNameLen || !utf8.ValidString(spec.Name) || strings.IndexByte(spec.Name, 0) >= 0:
		return fmt.Errorf("%w: token name: want 1 to %d bytes of UTF-8 without NUL", ErrInvalidArgument, MaxTokenNameLen)
	case spec.TTL <= 0 || spec.TTL > MaxTokenTTL:
		return fmt.Errorf("%w: token lifetime %s: want more than 0 and at most %s", ErrInvalidArgument, spec.TTL, MaxTokenTTL)
	case len(spec.Ops) == 0:
		return fmt.Errorf("%w: token needs at least one operation (%s)", ErrInvalidArgument, opList())
	case len(spec.Projects) > MaxTokenProjects:
		return fmt.Errorf("%w: token lists %d projects, at most %d", ErrInvalidArgument, len(spec.Projects), MaxTokenProjects)
	case spec.ClientCertSHA256 != nil && len(spec.ClientCertSHA256) != sha256.Size:
		return fmt.Errorf("%w: client certificate fingerprint: want %d bytes (SHA-256), got %d", ErrInvalidArgument, sha256.Size, len(spec.ClientCertSHA256))
	}
	for _, o := range spec.Ops {
		if o.bit() == 0 {
			return fmt.Errorf("%w: unknown operation %q (want %s)", ErrInvalidArgument, o, opList())
		}
	}
	for _, p := range spec.Projects {
		if p == "" || len(p) > pgstore.MaxProjectLen || !utf8.ValidString(p) || strings.IndexByte(p, 0) >= 0 {
			return fmt.Errorf("%w: token project: want 1 to %d bytes of UTF-8 without NUL", ErrInvalidArgument, pgstore.MaxProjectLen)
		}
	}
	return nil
}

func opList() string {
	s := make([]string, len(AllOps))
	for i, o := range AllOps {
		s[i] = string(o)
	}
	return strings.Join(s, ", ")
}

// Create stores a new token and returns it with its description. The
// token string is returned only here: the table keeps its SHA-256.
func (t *Tokens) Create(ctx context.Context, spec TokenSpec) (string, TokenInfo, error) {
	if err := checkSpec(spec); err != nil {
		return "", TokenInfo{}, err
	}
	var raw [tokenIDLen + tokenSecretLen]byte
	rand.Read(raw[:]) // never fails (crypto/rand, Go 1.24+)
	var id [tokenIDLen]byte
	copy(id[:], raw[:tokenIDLen])
	hash := sha256.Sum256(raw[tokenIDLen:])
	ops := dedupOps(spec.Ops)
	var projects []string
	if len(spec.Projects) > 0 {
		projects = slices.Compact(slices.Sorted(slices.Values(spec.Projects)))
	}
	info := TokenInfo{ID: hex.EncodeToString(id[:]), Name: spec.Name, Projects: projects, Ops: ops, ClientCertPrefix: certPrefix(spec.ClientCertSHA256)}
	err := t.pool.QueryRow(ctx, `INSERT INTO `+t.q+`.service_tokens (id, name, secret_hash, projects, operations, expires_at, client_cert_sha256)
VALUES ($1, $2, $3, $4, $5, now() + $6::bigint * interval '1 microsecond', $7) RETURNING created_at, expires_at`,
		pgtype.UUID{Bytes: id, Valid: true}, spec.Name, hash[:], projects, opStrings(ops), spec.TTL.Microseconds(), spec.ClientCertSHA256).
		Scan(&info.CreatedAt, &info.ExpiresAt)
	clear(hash[:])
	if err != nil {
		clear(raw[:])
		return "", TokenInfo{}, t.wrap("create token", err)
	}
	tok := TokenPrefix + base64.RawURLEncoding.EncodeToString(raw[:])
	clear(raw[:])
	return tok, info, nil
}

// certPrefix is TokenInfo.ClientCertPrefix for a stored fingerprint.
func certPrefix(fp []byte) string {
	if fp == nil {
		return ""
	}
	return hex.EncodeToString(fp)[:ClientCertPrefixLen]
}

func dedupOps(ops []Op) []Op {
	var out []Op
	for _, o := range AllOps {
		if slices.Contains(ops, o) {
			out = append(out, o)
		}
	}
	return out
}

func opStrings(ops []Op) []string {
	s := make([]string, len(ops))
	for i, o := range ops {
		s[i] = string(o)
	}
	return s
}

// List returns every token, newest first, revoked and expired ones
// included.
func (t *Tokens) List(ctx context.Context) ([]TokenInfo, error) {
	rows, err := t.pool.Query(ctx, `SELECT id, name, projects, operations, created_at, expires_at, revoked_at, client_cert_sha256
FROM `+t.q+`.service_tokens ORDER BY created_at DESC, id`)
	if err != nil {
		return nil, t.wrap("list tokens", err)
	}
	var out []TokenInfo
	var (
		id      pgtype.UUID
		ops     []string
		revoked pgtype.Timestamptz
		cert    []byte
		info    TokenInfo
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &info.Name, &info.Projects, &ops, &info.CreatedAt, &info.ExpiresAt, &revoked, &cert}, func() error {
		i := info
		i.ID = hex.EncodeToString(id.Bytes[:])
		i.ClientCertPrefix = certPrefix(cert)
		for _, o := range ops {
			i.Ops = append(i.Ops, Op(o))
		}
		if revoked.Valid {
			at := revoked.Time
			i.RevokedAt = &at
		}
		out = append(out, i)
		info.Projects = nil
		return nil
	})
	if err != nil {
		return nil, t.wrap("list tokens", err)
	}
	return out, nil
}

// Revoke revokes the token with the given id (as TokenInfo.ID shows it).
// Revoking a revoked token is a no-op; an unknown id is ErrTokenNotFound.
// A running server refuses the token within its Config.TokenRecheck.
func (t *Tokens) Revoke(ctx context.Context, id string) error {
	b, err := hex.DecodeString(id)
	if err != nil || len(b) != tokenIDLen {
		return fmt.Errorf("%w: token id: want 32 hex digits", ErrInvalidArgument)
	}
	ct, err := t.pool.Exec(ctx, `UPDATE `+t.q+`.service_tokens SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1`,
		pgtype.UUID{Bytes: [16]byte(b), Valid: true})
	if err != nil {
		return t.wrap("revoke token", err)
	}
	if ct.RowsAffected() == 0 {
		return fmt.Errorf("%w: %s", ErrTokenNotFound, id)
	}
	return nil
}

func (t *Tokens) wrap(what string, err error) error {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000") {
		return fmt.Errorf("%w: %s: table service_tokens missing (run keybroker migrate)", pgstore.ErrSchemaVersion, what)
	}
	return fmt.Errorf("server: %s: %w", what, err)
}

// parseToken splits a token string into its id and secret. It looks at
// nothing but the length and alphabet, so every malformed token is
// refused alike.
func parseToken(tok string) (id [tokenIDLen]byte, secret [tokenSecretLen]byte, ok bool) {
	if len(tok) != tokenLen || !strings.HasPrefix(tok, TokenPrefix) {
		return id, secret, false
	}
	var raw [tokenIDLen + tokenSecretLen]byte
	n, err := base64.RawURLEncoding.Strict().Decode(raw[:], []byte(tok[len(TokenPrefix):]))
	if err != nil || n != len(raw) {
		return id, secret, false
	}
	copy(id[:], raw[:tokenIDLen])
	copy(secret[:], raw[tokenIDLen:])
	clear(raw[:])
	return id, secret, true
}

// tokenRow is a token's row as the server caches it.
type tokenRow struct {
	id       [tokenIDLen]byte
	idHex    string
	hash     [32]byte
	all      bool // every project
	projects map[string]struct{}
	ops      uint8
	expires  time.Time
	revoked  bool
	bound    bool     // accepted only with the client certificate whose SHA-256 is cert
	cert     [32]byte // zero when not bound
	fetched  time.Time
}

// lookup reads one token row; found is false when no row has that id.
func (t *Tokens) lookup(ctx context.Context, id [tokenIDLen]byte) (row *tokenRow, found bool, err error) {
	var (
		hash     []byte
		projects []string
		ops      []string
		revoked  pgtype.Timestamptz
		cert     []byte
		r        = &tokenRow{id: id, idHex: hex.EncodeToString(id[:])}
	)
	err = t.pool.QueryRow(ctx, `SELECT secret_hash, projects, operations, expires_at, revoked_at, client_cert_sha256
FROM `+t.q+`.service_tokens WHERE id = $1`, pgtype.UUID{Bytes: id, Valid: true}).
		Scan(&hash, &projects, &ops, &r.expires, &revoked, &cert)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, t.wrap("token lookup", err)
	}
	copy(r.hash[:], hash)
	r.revoked = revoked.Valid
	if cert != nil {
		r.bound = true
		copy(r.cert[:], cert) // the column's CHECK makes it 32 bytes
	}
	if projects == nil {
		r.all = true
	} else {
		r.projects = make(map[string]struct{}, len(projects))
		for _, p := range projects {
			r.projects[p] = struct{}{}
		}
	}
	for _, o := range ops {
		r.ops |= Op(o).bit()
	}
	return r, true, nil
}

// matches reports, in constant time, whether secret hashes to the row's
// hash.
func (r *tokenRow) matches(secret *[tokenSecretLen]byte) bool {
	h := sha256.Sum256(secret[:])
	return subtle.ConstantTimeCompare(h[:], r.hash[:]) == 1
}

// certAccepts reports whether a request whose connection's verified leaf
// certificate hashes to peer (hasPeer false: no verified certificate) may
// use the token. It does the same compare for every row, bound or not,
// so the answer's cost does not tell a bound token from another.
func (r *tokenRow) certAccepts(peer *[32]byte, hasPeer bool) bool {
	want := &dummyCertHash
	if r.bound {
		want = &r.cert
	}
	eq := subtle.ConstantTimeCompare(peer[:], want[:]) == 1
	return !r.bound || (hasPeer && eq)
}

func (r *tokenRow) allows(op Op, project string) bool {
	if r.ops&op.bit() == 0 {
		return false
	}
	if r.all {
		return true
	}
	_, ok := r.projects[project]
	return ok
}
