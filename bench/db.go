package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// Names of the database contenders.
const (
	NamePlain    = "plain bytea"
	NamePgstore  = "keybroker pgstore"
	NamePgcrypto = "pgcrypto pgp_sym_*_bytea"
	// NamePlainSet is a diagnostic: plain bytea plus the set_config
	// statement pgstore sends in the same batch for row-level security.
	NamePlainSet = "plain bytea + set_config"
	dbProject    = "project-4711"
	// pgcryptoOptions matches keybroker's cipher; the S2K settings are
	// pgcrypto's defaults (iterated and salted, as its documentation
	// recommends).
	pgcryptoOptions = "cipher-algo=aes256"
)

// DB is a fresh database on a PostgreSQL server holding the three tables
// the database contenders write: pgstore's schema, and two plain tables
// of the same shape (project, name, bytea) for plain bytea and pgcrypto.
type DB struct {
	admin *pgx.Conn
	name  string
	Pool  *pgxpool.Pool
	Store *pgstore.Store
}

// OpenDB creates a database named kbbench_<random> on the server that
// adminURL (a superuser URL) names, with pgcrypto, the pgstore schema and
// the comparison tables. Close drops it.
func OpenDB(ctx context.Context, adminURL string, conns int32) (_ *DB, err error) {
	admin, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return nil, fmt.Errorf("bench: connect to PostgreSQL: %w", err)
	}
	db := &DB{admin: admin, name: "kbbench_" + randHex(6)}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+db.name); err != nil {
		admin.Close(ctx)
		return nil, fmt.Errorf("bench: create database: %w", err)
	}
	defer func() {
		if err != nil {
			db.Close()
		}
	}()
	u, err := url.Parse(adminURL)
	if err != nil {
		return nil, errors.New("bench: malformed database URL")
	}
	u.Path = "/" + db.name
	cfg, err := pgxpool.ParseConfig(u.String())
	if err != nil {
		return nil, errors.New("bench: malformed database URL")
	}
	cfg.MaxConns, cfg.MinConns = conns, conns
	if db.Pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		return nil, fmt.Errorf("bench: connect to %s: %w", db.name, err)
	}
	for _, q := range []string{
		"CREATE EXTENSION pgcrypto",
		"CREATE SCHEMA kbbench",
		`CREATE TABLE kbbench.plain (project_id text NOT NULL, name text NOT NULL, value bytea NOT NULL, PRIMARY KEY (project_id, name))`,
		`CREATE TABLE kbbench.plain_set (project_id text NOT NULL, name text NOT NULL, value bytea NOT NULL, PRIMARY KEY (project_id, name))`,
		`CREATE TABLE kbbench.pgcrypto (project_id text NOT NULL, name text NOT NULL, value bytea NOT NULL, PRIMARY KEY (project_id, name))`,
	} {
		if _, err := db.Pool.Exec(ctx, q); err != nil {
			return nil, fmt.Errorf("bench: %s: %w", strings.Fields(q)[0]+" "+strings.Fields(q)[1], err)
		}
	}
	if err := pgstore.Migrate(ctx, db.Pool, pgstore.DefaultSchema); err != nil {
		return nil, err
	}
	kek, err := local.Generate("bench")
	if err != nil {
		return nil, err
	}
	if db.Store, err = pgstore.New(ctx, db.Pool, pgstore.Config{KEK: kek}); err != nil {
		return nil, err
	}
	return db, nil
}

// Close drops the database.
func (db *DB) Close() {
	ctx := context.Background()
	if db.Store != nil {
		db.Store.Close()
	}
	if db.Pool != nil {
		db.Pool.Close()
	}
	db.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+db.name+" WITH (FORCE)")
	db.admin.Close(ctx)
}

// DBContender stores secrets by name and reads them back.
type DBContender struct {
	Name string
	Put  func(ctx context.Context, name string, value []byte) error
	Get  func(ctx context.Context, name string) ([]byte, error)
}

// setProject is the statement pgstore queues before each of its own.
const setProject = "SELECT set_config('keybroker.project_id', $1, true)"

// Contenders returns plain bytea (the baseline), plain bytea with
// pgstore's set_config statement in the same batch (a diagnostic), pgstore
// and pgcrypto with a random passphrase sent as a query parameter.
func (db *DB) Contenders() []*DBContender {
	pass := randHex(32)
	return []*DBContender{
		{
			Name: NamePlain,
			Put: func(ctx context.Context, name string, v []byte) error {
				_, err := db.Pool.Exec(ctx, `INSERT INTO kbbench.plain (project_id, name, value) VALUES ($1, $2, $3)
ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value`, dbProject, name, v)
				return err
			},
			Get: func(ctx context.Context, name string) (v []byte, err error) {
				err = db.Pool.QueryRow(ctx, `SELECT value FROM kbbench.plain WHERE project_id = $1 AND name = $2`, dbProject, name).Scan(&v)
				return v, err
			},
		},
		{
			Name: NamePlainSet,
			Put: func(ctx context.Context, name string, v []byte) error {
				b := &pgx.Batch{}
				b.Queue(setProject, dbProject)
				b.Queue(`INSERT INTO kbbench.plain_set (project_id, name, value) VALUES ($1, $2, $3)
ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value`, dbProject, name, v)
				return db.Pool.SendBatch(ctx, b).Close()
			},
			Get: func(ctx context.Context, name string) (v []byte, err error) {
				b := &pgx.Batch{}
				b.Queue(setProject, dbProject)
				b.Queue(`SELECT value FROM kbbench.plain_set WHERE project_id = $1 AND name = $2`, dbProject, name).QueryRow(func(r pgx.Row) error {
					return r.Scan(&v)
				})
				err = db.Pool.SendBatch(ctx, b).Close()
				return v, err
			},
		},
		{
			Name: NamePgstore,
			Put: func(ctx context.Context, name string, v []byte) error {
				return db.Store.Put(ctx, dbProject, name, v)
			},
			Get: func(ctx context.Context, name string) ([]byte, error) {
				return db.Store.Get(ctx, dbProject, name)
			},
		},
		{
			Name: NamePgcrypto,
			Put: func(ctx context.Context, name string, v []byte) error {
				_, err := db.Pool.Exec(ctx, `INSERT INTO kbbench.pgcrypto (project_id, name, value)
VALUES ($1, $2, pgp_sym_encrypt_bytea($3, $4, '`+pgcryptoOptions+`'))
ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value`, dbProject, name, v, pass)
				return err
			},
			Get: func(ctx context.Context, name string) (v []byte, err error) {
				err = db.Pool.QueryRow(ctx, `SELECT pgp_sym_decrypt_bytea(value, $3) FROM kbbench.pgcrypto WHERE project_id = $1 AND name = $2`,
					dbProject, name, pass).Scan(&v)
				return v, err
			},
		},
	}
}

// DBResult is one database contender's median per-row time for puts or
// gets.
type DBResult struct {
	Contender string
	Op        string // "put" or "get"
	NsPerRow  float64
	Rounds    []float64
	Rows      int // rows written or read in all rounds
	// ClientCPU and ServerCPU are CPU time per row over all rounds, of
	// this process and of the PostgreSQL server (-1: server not measured).
	ClientCPU, ServerCPU time.Duration
}

// RowsPerSec is the throughput.
func (r DBResult) RowsPerSec() float64 { return 1e9 / r.NsPerRow }

// MeasureDB puts rows secrets of size bytes with every contender, then gets
// them all back, in rounds: each round puts (then gets) rows/rounds
// secrets per contender, contenders in rotating order, from parallel
// goroutines (testing.B.RunParallel at the given parallelism). Every value
// read is compared with the value written.
//
// meter measures the CPU time each contender costs this process and the
// server.
func MeasureDB(ctx context.Context, cs []*DBContender, rows, size, rounds, parallelism int, meter CPUMeter, progress func(string)) ([]DBResult, error) {
	value := Payload(size)
	per := rows / rounds
	written := make([]atomic.Int64, len(cs))
	res := map[string]*DBResult{}
	var firstErr atomic.Pointer[error]
	fail := func(err error) {
		firstErr.CompareAndSwap(nil, &err)
	}
	phase := func(op string) error {
		for r := range rounds {
			for i := range cs {
				j := (i + r) % len(cs)
				c := cs[j]
				var next atomic.Int64
				c0, s0 := meter.Sample()
				br := runBenchmark(fmt.Sprintf("%dx", per), func(b *testing.B) {
					b.SetParallelism(parallelism)
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							if firstErr.Load() != nil {
								continue
							}
							if op == "put" {
								n := written[j].Add(1) - 1
								if err := c.Put(ctx, rowName(n), value); err != nil {
									fail(fmt.Errorf("%s: put: %w", c.Name, err))
								}
								continue
							}
							n := next.Add(1) % written[j].Load()
							got, err := c.Get(ctx, rowName(n))
							if err != nil {
								fail(fmt.Errorf("%s: get: %w", c.Name, err))
							} else if !bytes.Equal(got, value) {
								fail(fmt.Errorf("%s: get %s returned other bytes than were put", c.Name, rowName(n)))
							}
						}
					})
				})
				c1, s1 := meter.Sample()
				if p := firstErr.Load(); p != nil {
					return *p
				}
				k := c.Name + "/" + op
				if res[k] == nil {
					res[k] = &DBResult{Contender: c.Name, Op: op}
				}
				res[k].ClientCPU += c1 - c0
				if s0 < 0 || res[k].ServerCPU < 0 {
					res[k].ServerCPU = -1
				} else {
					res[k].ServerCPU += s1 - s0
				}
				res[k].Rounds = append(res[k].Rounds, float64(br.T.Nanoseconds())/float64(br.N))
				res[k].Rows += br.N
				if progress != nil {
					progress(fmt.Sprintf("%s round %d/%d, %s", op, r+1, rounds, c.Name))
				}
			}
		}
		return nil
	}
	if err := phase("put"); err != nil {
		return nil, err
	}
	if err := phase("get"); err != nil {
		return nil, err
	}
	var out []DBResult
	for _, op := range []string{"put", "get"} {
		for _, c := range cs {
			r := res[c.Name+"/"+op]
			r.NsPerRow = median(r.Rounds)
			// testing.Benchmark runs one op before the N asked for.
			r.ClientCPU /= time.Duration(r.Rows + rounds)
			if r.ServerCPU > 0 {
				r.ServerCPU /= time.Duration(r.Rows + rounds)
			}
			out = append(out, *r)
		}
	}
	return out, nil
}

func rowName(n int64) string { return fmt.Sprintf("webhooks/secret-%07d", n) }

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// SQLCost is the cost per row of pgcrypto and a plain insert inside one
// SQL statement over many rows.
type SQLCost struct {
	Rows, PlainRows                 int
	EncWall, DecWall, InsWall       time.Duration
	EncServer, DecServer, InsServer time.Duration // server CPU; -1 if unknown
}

// SQLCost measures what the issue quotes: the server-side cost per row of
// pgp_sym_encrypt_bytea, pgp_sym_decrypt_bytea and a plain bytea insert,
// each over n rows in one statement (no client round trip per row), as
// elapsed time and, when meter knows the server, as server CPU time.
func (db *DB) SQLCost(ctx context.Context, n, size int, meter CPUMeter) (SQLCost, error) {
	pass := randHex(32)
	v := Payload(size)
	// A plain insert is ~100× cheaper: more rows keep it above the 10 ms
	// resolution of /proc CPU times.
	c := SQLCost{Rows: n, PlainRows: 50 * n}
	timed := func(wall, server *time.Duration, q string, n int, args ...any) error {
		_, s0 := meter.Sample()
		t0 := time.Now()
		_, err := db.Pool.Exec(ctx, q, args...)
		*wall = time.Since(t0) / time.Duration(n)
		_, s1 := meter.Sample()
		*server = -1
		if s0 >= 0 {
			*server = (s1 - s0) / time.Duration(n)
		}
		return err
	}
	for _, q := range []string{`CREATE TABLE kbbench.sqlcost_plain (value bytea)`, `CREATE TABLE kbbench.sqlcost_enc (value bytea)`} {
		if _, err := db.Pool.Exec(ctx, q); err != nil {
			return c, err
		}
	}
	if err := timed(&c.InsWall, &c.InsServer, `INSERT INTO kbbench.sqlcost_plain SELECT $1::bytea FROM generate_series(1, $2)`, c.PlainRows, v, c.PlainRows); err != nil {
		return c, err
	}
	if err := timed(&c.EncWall, &c.EncServer, `INSERT INTO kbbench.sqlcost_enc SELECT pgp_sym_encrypt_bytea($1::bytea, $3, '`+pgcryptoOptions+`') FROM generate_series(1, $2)`, n, v, n, pass); err != nil {
		return c, err
	}
	err := timed(&c.DecWall, &c.DecServer, `SELECT sum(length(pgp_sym_decrypt_bytea(value, $1))) FROM kbbench.sqlcost_enc WHERE $2::int > 0`, n, pass, n)
	return c, err
}
