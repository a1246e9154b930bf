package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/gcpkms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
)

// Every way a data key can fail to unwrap for a reason that is about the
// stored rows gives Get exactly the error an altered ciphertext gives:
// envelope.ErrDecrypt, with the same message, so the error is no oracle
// for which column was edited.
func TestDataKeyFailuresAreErrDecrypt(t *testing.T) {
	ctx := context.Background()
	// Budget 1: every Put makes a new data key, so project a has two.
	e := newEnv(t, pgstore.Config{Budget: 1, ReserveChunk: 1})
	for _, p := range []struct{ project, name string }{{"a", "x"}, {"a", "y"}, {"b", "x"}} {
		if err := e.store.Put(ctx, p.project, p.name, []byte(p.project+p.name)); err != nil {
			t.Fatal(err)
		}
	}
	exec := func(sql string) {
		t.Helper()
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// key is the data key of secret a/x, kekRow the kek row that wrapped it.
	const key = `(SELECT data_key_id FROM keybroker.encrypted_secrets WHERE project_id = 'a' AND name = 'x')`
	const kekRow = `(SELECT kek_id FROM keybroker.data_keys WHERE id = ` + key + `)`
	get := func() error {
		t.Helper()
		fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek}) // empty cache: unwraps from the rows
		got, err := fresh.Get(ctx, "a", "x")
		if err != nil && got != nil {
			t.Fatalf("plaintext returned with %v", err)
		}
		return err
	}
	if err := get(); err != nil {
		t.Fatal(err)
	}
	// The reference: an altered ciphertext.
	exec(`UPDATE keybroker.encrypted_secrets SET encrypted_data = set_byte(encrypted_data, length(encrypted_data) - 1, get_byte(encrypted_data, length(encrypted_data) - 1) # 1) WHERE project_id = 'a' AND name = 'x'`)
	want := get()
	if want == nil || !errors.Is(want, envelope.ErrDecrypt) {
		t.Fatalf("altered ciphertext: %v", want)
	}
	exec(`UPDATE keybroker.encrypted_secrets SET encrypted_data = set_byte(encrypted_data, length(encrypted_data) - 1, get_byte(encrypted_data, length(encrypted_data) - 1) # 1) WHERE project_id = 'a' AND name = 'x'`)

	exec(`CREATE TABLE saved AS SELECT id, kek_id, wrapped_dek FROM keybroker.data_keys`)
	exec(`CREATE TABLE saved_kek AS SELECT * FROM keybroker.kek`)
	restore := `UPDATE keybroker.data_keys d SET kek_id = s.kek_id, wrapped_dek = s.wrapped_dek FROM saved s WHERE s.id = d.id;
		UPDATE keybroker.kek k SET provider = s.provider, key_id = s.key_id, key_version = s.key_version FROM saved_kek s WHERE s.id = k.id`
	for _, c := range []struct{ name, sql string }{
		{"bit flipped in the sealed key", `UPDATE keybroker.data_keys SET wrapped_dek = set_byte(wrapped_dek, 20, get_byte(wrapped_dek, 20) # 1) WHERE id = ` + key},
		{"format byte changed", `UPDATE keybroker.data_keys SET wrapped_dek = set_byte(wrapped_dek, 0, 2) WHERE id = ` + key},
		{"truncated", `UPDATE keybroker.data_keys SET wrapped_dek = substring(wrapped_dek from 1 for length(wrapped_dek) - 1) WHERE id = ` + key},
		{"one byte", `UPDATE keybroker.data_keys SET wrapped_dek = '\x01' WHERE id = ` + key},
		{"swapped within the project", `UPDATE keybroker.data_keys t SET wrapped_dek = f.wrapped_dek FROM keybroker.data_keys f
			WHERE t.id = ` + key + ` AND f.project_id = 'a' AND f.id <> t.id`},
		{"from another project", `UPDATE keybroker.data_keys t SET wrapped_dek = f.wrapped_dek FROM keybroker.data_keys f
			WHERE t.id = ` + key + ` AND f.project_id = 'b'`},
		{"kek_id repointed to an unknown version", `INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('local', 'test', '7');
			UPDATE keybroker.data_keys SET kek_id = (SELECT id FROM keybroker.kek WHERE key_version = '7') WHERE id = ` + key},
		{"kek row's key id edited", `UPDATE keybroker.kek SET key_id = 'other' WHERE id = ` + kekRow},
		{"kek row's provider edited", `UPDATE keybroker.kek SET provider = 'vault' WHERE id = ` + kekRow},
		{"kek row's version edited", `UPDATE keybroker.kek SET key_version = '01' WHERE id = ` + kekRow},
		// The foreign keys bypassed (a superuser, a dropped constraint, a
		// partial restore): the secret names a data key that is not there.
		{"data key row missing", `SET session_replication_role = replica;
			DELETE FROM keybroker.data_keys WHERE id = ` + key + `;
			RESET session_replication_role`},
	} {
		exec(c.sql)
		err := get()
		if !errors.Is(err, envelope.ErrDecrypt) || err.Error() != want.Error() {
			t.Errorf("%s: %v; want %q", c.name, err, want)
		}
		if errors.Is(err, provider.ErrInvalidCiphertext) || errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("%s: %v matches a provider error", c.name, err)
		}
		exec(restore)
	}
}

// A data_keys row relabelled to another project is not used for that
// project by a process that has the key cached for the first: the Put is
// refused, rather than acknowledged and unreadable by every other process.
func TestCachedDataKeyRelabelled(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if err := e.store.Put(ctx, "a", "x", []byte("v")); err != nil { // a's data key, now cached
		t.Fatal(err)
	}
	if err := e.store.Delete(ctx, "a", "x"); err != nil { // so the foreign key lets the row move
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET project_id = 'b' WHERE project_id = 'a'`); err != nil {
		t.Fatal(err)
	}
	err := e.store.Put(ctx, "b", "y", []byte("w"))
	if err == nil {
		fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
		got, gerr := fresh.Get(ctx, "b", "y")
		t.Fatalf("Put to b under a's relabelled key acknowledged; another process reads %q, %v", got, gerr)
	}
	if !errors.Is(err, envelope.ErrDecrypt) || !strings.HasPrefix(err.Error(), "pgstore: ") {
		t.Fatalf("Put under a relabelled data key: %v, want ErrDecrypt with the package's prefix", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets`); n != 0 {
		t.Fatalf("%d secrets stored", n)
	}
}

// Failures that say nothing about the rows stay distinguishable from
// ErrDecrypt: an unreachable key service, access denied, a disabled key
// version.
func TestDataKeyOutagesStayDistinct(t *testing.T) {
	ctx := context.Background()
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	name, err := srv.NewKey("r", "k")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := gcpkms.Open(ctx, name, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kek.Close() })
	e := newEnv(t, pgstore.Config{KEK: kek})
	if err := e.store.Put(ctx, "p", "n", []byte("v")); err != nil {
		t.Fatal(err)
	}
	get := func(ctx context.Context) error {
		t.Helper()
		_, err := newStore(t, e.pool, pgstore.Config{KEK: kek}).Get(ctx, "p", "n")
		if errors.Is(err, envelope.ErrDecrypt) {
			t.Fatalf("%v matches ErrDecrypt", err)
		}
		return err
	}
	srv.SetInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		return nil, status.Error(codes.PermissionDenied, "Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied")
	})
	if err := get(ctx); !errors.Is(err, provider.ErrAccessDenied) {
		t.Errorf("access denied: %v", err)
	}
	srv.SetInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		return nil, status.Error(codes.Unavailable, "connection reset")
	})
	// gcpkms retries an unavailable service until ctx ends.
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	err = get(short)
	cancel()
	if !errors.Is(err, provider.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("unavailable: %v", err)
	}
	srv.SetInterceptor(nil)
	if _, err := srv.UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: name + "/cryptoKeyVersions/1", State: kmspb.CryptoKeyVersion_DISABLED},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	}); err != nil {
		t.Fatal(err)
	}
	if err := get(ctx); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Errorf("disabled version: %v", err)
	}
}
