package pgstore_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/localkms"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/internal/vaultserver"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/awskms"
	_ "github.com/profullstack/keybroker/provider/vault"
)

var (
	kmsOnce sync.Once
	kmsSrv  *localkms.Server
	kmsErr  error
)

// localKMS is the package's one local-kms server, started on first use
// (and killed when the test binary's TestMain ends: see stopLocalKMS).
func localKMS(t *testing.T) *localkms.Server {
	t.Helper()
	kmsOnce.Do(func() {
		dir, err := os.MkdirTemp("", "keybroker-pgstore-kms-")
		if err != nil {
			kmsErr = err
			return
		}
		localkms.SetTestEnv(dir)
		kmsSrv, kmsErr = localkms.Start(dir, "", "")
		if kmsErr == nil {
			stopAtExit(func() { kmsSrv.Stop(); os.RemoveAll(dir) })
		}
	})
	if kmsErr != nil {
		t.Fatal(kmsErr)
	}
	return kmsSrv
}

func kmsKey(t *testing.T, s *localkms.Server) string {
	t.Helper()
	arn, err := s.CreateKey(context.Background(), "keybroker pgstore "+t.Name())
	if err != nil {
		t.Fatal(err)
	}
	return arn
}

func startVault(t *testing.T) *vaultserver.Server {
	t.Helper()
	s, err := vaultserver.Start(context.Background(), vaultserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	if err := s.Root.Sys().Mount("transit", &api.MountInput{Type: "transit"}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", s.Addr)
	t.Setenv("VAULT_TOKEN", s.Token)
	return s
}

func vaultKey(t *testing.T, s *vaultserver.Server, name string) string {
	t.Helper()
	if _, err := s.Root.Logical().Write("transit/keys/"+name, nil); err != nil {
		t.Fatal(err)
	}
	return "vault://transit/keys/" + name + "?addr=" + s.Addr
}

// chainOf returns the chain (kek key_id) and provider of the kek rows
// wrapping project's data keys, as "provider:key_id" strings, deduplicated.
func chainsOf(t *testing.T, e *env, project string) []string {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT DISTINCT k.provider || ':' || k.key_id FROM keybroker.data_keys d
JOIN keybroker.kek k ON k.id = d.kek_id WHERE d.project_id = $1 ORDER BY 1`, project)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

func mustPut(t *testing.T, s *pgstore.Store, project, name, value string) {
	t.Helper()
	if err := s.Put(context.Background(), project, name, []byte(value)); err != nil {
		t.Fatalf("put %s/%s: %v", project, name, err)
	}
}

func mustGet(t *testing.T, s *pgstore.Store, project, name, want string) {
	t.Helper()
	got, err := s.Get(context.Background(), project, name)
	if err != nil {
		t.Fatalf("get %s/%s: %v", project, name, err)
	}
	if string(got) != want {
		t.Fatalf("get %s/%s = %q, want %q", project, name, got, want)
	}
}

// tenantKEKs binds projects a and b to KEKs urlA and urlB, checks that
// their data keys move under their own chains by Rewrap (no secret
// re-encrypted), and returns the env; project c stays on the deployment's.
func tenantKEKs(t *testing.T, cfg pgstore.Config, urlA, urlB string) *env {
	t.Helper()
	ctx := context.Background()
	e := newEnv(t, cfg)
	for _, p := range []string{"a", "b", "c"} {
		mustPut(t, e.store, p, "old", "old-"+p)
	}
	before := count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets`)
	blobs := snapshotSecrets(t, e)
	ba, err := e.store.SetProjectKEK(ctx, "a", urlA)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.SetProjectKEK(ctx, "b", urlB); err != nil {
		t.Fatal(err)
	}
	again, err := e.store.SetProjectKEK(ctx, "a", urlA)
	if err != nil || again.Chain != ba.Chain {
		t.Fatalf("binding a again: chain %q, %v; want %q unchanged", again.Chain, err, ba.Chain)
	}
	if !strings.HasPrefix(ba.Chain, "tenant-") {
		t.Fatalf("chain %q", ba.Chain)
	}
	st, err := e.store.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.ProjectKEKs) != 2 || st.ProjectKEKs[0].Project != "a" || st.ProjectKEKs[0].Pending != 1 {
		t.Fatalf("status before rewrap: %+v", st.ProjectKEKs)
	}
	res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Remaining != 0 || res.Rewrapped != 2 {
		t.Fatalf("rewrap: %+v, want 2 rewrapped, 0 remaining", res)
	}
	if got := chainsOf(t, e, "a"); len(got) != 1 || got[0] != "intermediate:"+ba.Chain {
		t.Fatalf("project a's data keys under %v, want its chain %s", got, ba.Chain)
	}
	if got := chainsOf(t, e, "c"); len(got) != 1 || got[0] != "intermediate:"+hierarchy.DefaultKeyID {
		t.Fatalf("project c's data keys under %v, want the deployment's chain", got)
	}
	if after := snapshotSecrets(t, e); after != blobs || count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets`) != before {
		t.Fatal("rewrap changed secrets")
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'project.kek.set'`); n != 2 {
		t.Fatalf("%d project.kek.set events, want 2", n)
	}
	// A fresh Store (no cached key) reads all, and new data keys of a
	// bound project go under its chain.
	fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek, TenantKEKSchemes: cfg.TenantKEKSchemes})
	for _, p := range []string{"a", "b", "c"} {
		mustGet(t, fresh, p, "old", "old-"+p)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET state = 'spent' WHERE project_id = 'a'`); err != nil {
		t.Fatal(err)
	}
	fresh2 := newStore(t, e.pool, pgstore.Config{KEK: e.kek, TenantKEKSchemes: cfg.TenantKEKSchemes})
	mustPut(t, fresh2, "a", "new", "new-a")
	if got := chainsOf(t, e, "a"); len(got) != 1 || got[0] != "intermediate:"+ba.Chain {
		t.Fatalf("project a's new data key under %v, want its chain", got)
	}
	return e
}

// Two local-kms keys: disabling one makes its project's reads fail with
// ErrKeyDisabled (not ErrDecrypt) while the other projects keep working;
// unbinding moves the project back by Rewrap.
func TestProjectKEKLocalKMS(t *testing.T) {
	ctx := context.Background()
	kmsS := localKMS(t)
	arnA, arnB := kmsKey(t, kmsS), kmsKey(t, kmsS)
	e := tenantKEKs(t, pgstore.Config{}, kmsS.URL(arnA), kmsS.URL(arnB))

	if _, err := kmsS.Admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(arnA)}); err != nil {
		t.Fatal(err)
	}
	s := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	_, err := s.Get(ctx, "a", "old")
	if !errors.Is(err, provider.ErrKeyDisabled) || errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("get from the project whose KEK is disabled: %v, want ErrKeyDisabled", err)
	}
	mustGet(t, s, "b", "old", "old-b")
	mustGet(t, s, "c", "old", "old-c")
	mustPut(t, s, "c", "more", "more-c")

	// Unbinding b moves it back to the deployment's chain.
	if err := s.UnsetProjectKEK(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := s.UnsetProjectKEK(ctx, "b"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("unset twice: %v, want ErrNotFound", err)
	}
	// Project a's KEK is disabled: Rewrap says so, after doing the rest.
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{})
	if !errors.Is(err, provider.ErrKeyDisabled) || !strings.Contains(err.Error(), `project "a"`) || res.Rewrapped != 1 {
		t.Fatalf("rewrap after unbinding b, a's KEK disabled: %+v, %v; want b's 1 data key rewrapped and a's ErrKeyDisabled", res, err)
	}
	if got := chainsOf(t, e, "b"); len(got) != 1 || got[0] != "intermediate:"+hierarchy.DefaultKeyID {
		t.Fatalf("project b's data keys under %v after unset and rewrap, want the deployment's chain", got)
	}
	mustGet(t, newStore(t, e.pool, pgstore.Config{KEK: e.kek}), "b", "old", "old-b")
	if _, err := kmsS.Admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(arnA)}); err != nil {
		t.Fatal(err)
	}
	mustGet(t, newStore(t, e.pool, pgstore.Config{KEK: e.kek}), "a", "old", "old-a")

	// The project's own chain rotates, rewraps locally and retires like
	// the deployment's; its current version cannot be retired.
	b, _, err := s.ProjectKEK(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	v2, err := s.RotateProjectIntermediate(ctx, "a")
	if err != nil || v2.Version != "2" || v2.KeyID != b.Chain {
		t.Fatalf("rotate a's chain: %v, %v", v2, err)
	}
	if res, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Rewrapped != 2 || res.Remaining != 0 {
		t.Fatalf("rewrap to a's new version: %+v, %v; want a's 2 data keys", res, err)
	}
	if err := s.RetireKEK(ctx, v2); !errors.Is(err, pgstore.ErrPrimaryVersion) {
		t.Fatalf("retire a's current intermediate key: %v, want ErrPrimaryVersion", err)
	}
	v1 := pgstore.KEKVersion{Provider: "intermediate", KeyID: b.Chain, Version: "1"}
	if err := s.RetireKEK(ctx, v1); err != nil {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.intermediate_keys WHERE key_id = $1`, b.Chain); n != 1 {
		t.Fatalf("%d intermediate keys left in a's chain after retiring version 1, want 1", n)
	}
	mustGet(t, newStore(t, e.pool, pgstore.Config{KEK: e.kek}), "a", "new", "new-a")
	if _, err := s.RotateProjectIntermediate(ctx, "c"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("rotate an unbound project's chain: %v, want ErrNotFound", err)
	}
}

// Two Vault transit keys: deleting one crypto-shreds its project only.
func TestProjectKEKVault(t *testing.T) {
	ctx := context.Background()
	v := startVault(t)
	urlA, urlB := vaultKey(t, v, "tenant-a"), vaultKey(t, v, "tenant-b")
	cfg := pgstore.Config{TenantKEKSchemes: []string{"vault"}}
	e := tenantKEKs(t, cfg, urlA, urlB)
	if _, err := v.Root.Logical().Write("transit/keys/tenant-a/config", map[string]any{"deletion_allowed": true}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Root.Logical().Delete("transit/keys/tenant-a"); err != nil {
		t.Fatal(err)
	}
	s := newStore(t, e.pool, pgstore.Config{KEK: e.kek, TenantKEKSchemes: cfg.TenantKEKSchemes})
	if _, err := s.Get(ctx, "a", "old"); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("get from the project whose KEK is destroyed: %v, want ErrDecrypt", err)
	}
	mustGet(t, s, "b", "old", "old-b")
	mustGet(t, s, "c", "old", "old-c")
}

// What a binding may name, and who may write one.
func TestProjectKEKRefused(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	for _, u := range []string{
		"local:///etc/keybroker/keyring.json",
		"local://env/KEYBROKER_KEY",
		"vault://transit/keys/x?addr=http://127.0.0.1:1",
		"awskms:///alias/x?token_file=/etc/shadow",
		"awskms://user:pw@alias/x",
		"nonsense",
	} {
		_, err := e.store.SetProjectKEK(ctx, "p", u)
		if !errors.Is(err, pgstore.ErrTenantKEKRefused) {
			t.Errorf("SetProjectKEK(%q): %v, want ErrTenantKEKRefused", u, err)
		}
		if err != nil && strings.Contains(err.Error(), "/etc/") {
			t.Errorf("error echoes the URL: %v", err)
		}
	}
	if _, err := pgstore.New(ctx, e.pool, pgstore.Config{KEK: e.kek, TenantKEKSchemes: []string{"local"}}); !errors.Is(err, pgstore.ErrInvalidArgument) {
		t.Fatalf("Config.TenantKEKSchemes with local: %v, want ErrInvalidArgument", err)
	}
	// A row written behind pgstore's back naming a local file is refused
	// when read, not opened.
	mustPut(t, e.store, "p", "s", "v")
	if _, err := e.pool.Exec(ctx, `INSERT INTO keybroker.tenant_chains VALUES ('tenant-evil', 'p', 'local:///tmp/evil.json');
INSERT INTO keybroker.project_keks (project_id, chain_id) VALUES ('p', 'tenant-evil')`); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET state = 'spent' WHERE project_id = 'p'`); err != nil {
		t.Fatal(err)
	}
	if err := newStore(t, e.pool, pgstore.Config{KEK: e.kek}).Put(ctx, "p", "t", []byte("v")); !errors.Is(err, pgstore.ErrTenantKEKRefused) {
		t.Fatalf("put under a binding naming a local file: %v, want ErrTenantKEKRefused", err)
	}
	// The fence: a data key of a bound project moved anywhere but its
	// chain (here directly under the deployment's KEK). An update that
	// leaves kek_id and project_id as they were is not fenced again
	// (migration 012): the key is where it was before the binding, and
	// budget reservations must go on until Rewrap moves it.
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = kek_id WHERE project_id = 'p'`); err != nil {
		t.Fatalf("update leaving a bound project's key where it was: %v", err)
	}
	_, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = (SELECT id FROM keybroker.kek WHERE provider <> 'intermediate' ORDER BY id LIMIT 1) WHERE project_id = 'p'`)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "KB006" {
		t.Fatalf("data key of a bound project moved off its chain: %v, want KB006", err)
	}
	// A tenant role may read its binding, not write one.
	tenant := pgtest.PoolFor(t, tenantURL(t, e))
	if _, err := tenant.Exec(ctx, `DELETE FROM keybroker.project_keks`); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("tenant deleting bindings: %v, want permission denied", err)
	}
	if _, err := tenant.Exec(ctx, `INSERT INTO keybroker.tenant_chains VALUES ('tenant-x', 'q', 'awskms:///alias/x')`); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("tenant writing a chain: %v, want permission denied", err)
	}
}
