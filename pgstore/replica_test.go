package pgstore_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgserver"
	"github.com/profullstack/keybroker/pgstore"
)

// replicaPair is a primary and a streaming hot standby of it (internal/pgserver), with a pool
// on each.
type replicaPair struct {
	primary, standby *pgxpool.Pool
}

func startReplicaPair(t *testing.T) *replicaPair {
	t.Helper()
	ctx := context.Background()
	p, err := pgserver.Start(ctx, pgserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop() })
	s, err := pgserver.StartStandby(ctx, p, "replica", pgserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	r := &replicaPair{primary: poolFor(t, p.URL), standby: poolFor(t, s.URL)}
	if err := pgstore.Migrate(ctx, r.primary, ""); err != nil {
		t.Fatal(err)
	}
	r.caughtUp(t)
	return r
}

func poolFor(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// poll runs cond every 20ms until it holds, failing t after a minute.
func poll(t *testing.T, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var last error
	for {
		ok, err := cond(ctx)
		if ok && err == nil {
			return
		}
		last = err
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v (last error: %v)", what, ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// caughtUp waits until the standby has replayed everything the primary has written. The
// primary's insert position, not its write position: the test servers run with
// synchronous_commit off, so a commit's WAL may still be in the primary's buffers when the
// commit returns, before the write position reaches it.
func (r *replicaPair) caughtUp(t *testing.T) {
	t.Helper()
	var lsn string
	if err := r.primary.QueryRow(context.Background(), `SELECT pg_current_wal_insert_lsn()::text`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	poll(t, "the standby to replay "+lsn, func(ctx context.Context) (bool, error) {
		var ok bool
		err := r.standby.QueryRow(ctx, `SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn`, lsn).Scan(&ok)
		return ok, err
	})
}

// pauseReplay stops the standby's replay (it keeps receiving WAL) until resumeReplay.
func (r *replicaPair) pauseReplay(t *testing.T) {
	t.Helper()
	if _, err := r.standby.Exec(context.Background(), `SELECT pg_wal_replay_pause()`); err != nil {
		t.Fatal(err)
	}
	poll(t, "replay paused", func(ctx context.Context) (bool, error) {
		var state string
		err := r.standby.QueryRow(ctx, `SELECT pg_get_wal_replay_pause_state()`).Scan(&state)
		return state == "paused", err
	})
}

// resumeReplay resumes the standby's replay and waits until its encrypted_secrets rows are the
// primary's (the same nonces: the same envelopes).
func (r *replicaPair) resumeReplay(t *testing.T) {
	t.Helper()
	if _, err := r.standby.Exec(context.Background(), `SELECT pg_wal_replay_resume()`); err != nil {
		t.Fatal(err)
	}
	r.caughtUp(t)
	const rows = `SELECT coalesce(string_agg(project_id || '/' || name || '/' || encode(nonce, 'hex'), ',' ORDER BY project_id, name), '') FROM keybroker.encrypted_secrets`
	var want string
	if err := r.primary.QueryRow(context.Background(), rows).Scan(&want); err != nil {
		t.Fatal(err)
	}
	poll(t, "the standby's secrets to be the primary's", func(ctx context.Context) (bool, error) {
		var got string
		err := r.standby.QueryRow(ctx, rows).Scan(&got)
		return got == want, err
	})
}

func (r *replicaPair) standbyCount(t *testing.T, sql string, args ...any) int64 {
	t.Helper()
	return count(t, r.standby, sql, args...)
}

// TestReadPool: Get and GetMany served from a real streaming standby, falling back to the
// primary for what the standby has not replayed: a new project's data key and secret, and a
// data key the primary rewrapped before retiring the version the standby still has it under.
// An update not yet replayed reads as the previous value (what Config.ReadPool documents for an
// asynchronous standby), and with synchronous_commit = remote_apply it reads back at once.
func TestReadPool(t *testing.T) {
	ctx := context.Background()
	r := startReplicaPair(t)
	kek := openFile(t, keyringFile(t))
	writer := newStore(t, r.primary, pgstore.Config{KEK: kek, DirectKEK: true})
	reader := newStore(t, r.primary, pgstore.Config{KEK: kek, ReadPool: r.standby, DirectKEK: true})
	mustPut := func(project, name, value string) {
		t.Helper()
		if err := writer.Put(ctx, project, name, []byte(value)); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(st *pgstore.Store, project, name, want string) {
		t.Helper()
		got, err := st.Get(ctx, project, name)
		if err != nil || string(got) != want {
			t.Fatalf("get %s/%s: %q, %v; want %q", project, name, got, err, want)
		}
	}
	mustPut("p1", "a", "a1")
	mustPut("p1", "b", "b1")
	r.caughtUp(t)
	expect(reader, "p1", "a", "a1")

	r.pauseReplay(t)
	// The standby serves reads: an update it has not replayed reads as the previous value.
	mustPut("p1", "a", "a2")
	expect(reader, "p1", "a", "a1")
	// A new project: its data key and secret exist only on the primary, and are read there.
	mustPut("p2", "c", "c1")
	if n := r.standbyCount(t, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p2'`); n != 0 {
		t.Fatalf("the paused standby has %d data keys of p2", n)
	}
	expect(reader, "p2", "c", "c1")
	got, err := reader.GetMany(ctx, "p2", []string{"c", "unset"})
	if err != nil || len(got) != 1 || string(got["c"]) != "c1" {
		t.Fatalf("get many from p2: %q, %v", got, err)
	}
	// Served partly by each: b from the standby, c from the primary.
	mustPut("p1", "c", "c1")
	got, err = reader.GetMany(ctx, "p1", []string{"a", "b", "c", "unset"})
	if err != nil || len(got) != 3 || string(got["a"]) != "a1" || string(got["b"]) != "b1" || string(got["c"]) != "c1" {
		t.Fatalf("get many from p1: %q, %v", got, err)
	}
	if _, err := reader.Get(ctx, "p1", "unset"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("get unset: %v", err)
	}

	// The primary rotates, rewraps every data key and retires version 1, which the standby
	// still has p1's data key under: a fresh reader (nothing cached) cannot open it there and
	// reads the current value from the primary.
	v1, err := writer.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writer.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := writer.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Remaining != 0 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if err := writer.RetireKEK(ctx, v1); err != nil {
		t.Fatal(err)
	}
	fresh := newStore(t, r.primary, pgstore.Config{KEK: kek, ReadPool: r.standby, DirectKEK: true})
	// (a first: once the primary has given the data key to fresh's cache, the standby's rows
	// under it open too, as values the primary held at the standby's replay position.)
	expect(fresh, "p1", "a", "a2")
	expect(fresh, "p1", "b", "b1")
	// The standby really holds p1's key under the retired version only.
	if n := r.standbyCount(t, `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id
WHERE d.project_id = 'p1' AND k.key_version = $1`, v1.Version); n == 0 {
		t.Fatal("the standby has no p1 data key under the retired version")
	}

	r.resumeReplay(t)
	expect(reader, "p1", "a", "a2")

	// Read-your-writes for updates: a writer whose commits wait for the standby's replay.
	if _, err := r.primary.Exec(ctx, `ALTER SYSTEM SET synchronous_standby_names = 'replica'`); err != nil {
		t.Fatal(err)
	}
	if _, err := r.primary.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
		t.Fatal(err)
	}
	poll(t, "the standby synchronous", func(ctx context.Context) (bool, error) {
		var states []string
		rows, err := r.primary.Query(ctx, `SELECT sync_state FROM pg_stat_replication WHERE application_name = 'replica'`)
		if err != nil {
			return false, err
		}
		for rows.Next() {
			var st string
			rows.Scan(&st)
			states = append(states, st)
		}
		return slices.Equal(states, []string{"sync"}), rows.Err()
	})
	cfg := r.primary.Config().Copy()
	cfg.ConnConfig.RuntimeParams["synchronous_commit"] = "remote_apply"
	applyPool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer applyPool.Close()
	applied := newStore(t, applyPool, pgstore.Config{KEK: kek, ReadPool: r.standby, DirectKEK: true})
	for i, v := range []string{"a3", "a4", "a5"} {
		if err := applied.Put(ctx, "p1", "a", []byte(v)); err != nil {
			t.Fatal(err)
		}
		// Straight from the standby (found and opened there, so no fallback): the new value.
		got, err := applied.Get(ctx, "p1", "a")
		if err != nil || string(got) != v {
			t.Fatalf("read-your-write %d: %q, %v; want %q", i, got, err, v)
		}
	}
}
