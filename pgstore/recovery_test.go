package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// recoveryDrill stores secrets under primary (with two intermediate key
// versions), adds a recovery wrap under a local keyring, calls lose (which
// makes primary unusable), checks reads fail, recovers onto newPrimary
// with the recovery keyring and checks every secret reads back.
func recoveryDrill(t *testing.T, primary provider.KEKProvider, lose func(), newPrimary provider.KEKProvider) {
	t.Helper()
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{KEK: primary})
	type secret struct{ project, name string }
	want := map[secret]string{}
	put := func(p string, n int) {
		for i := range n {
			k, v := fmt.Sprintf("s%d", i), fmt.Sprintf("%s-value-%d", p, i)
			mustPut(t, e.store, p, k, v)
			want[secret{p, k}] = v
		}
	}
	put("p1", 3)
	if _, err := e.store.RotateIntermediate(ctx); err != nil {
		t.Fatal(err)
	}
	put("p2", 3)
	rec := newKEK(t, "recovery")
	res, err := e.store.AddRecovery(ctx, rec)
	if err != nil || res.Done != 2 || res.Total != 2 {
		t.Fatalf("AddRecovery: %+v, %v; want 2 of 2", res, err)
	}
	if res, err := e.store.AddRecovery(ctx, rec); err != nil || res.Done != 0 || res.Already != 2 {
		t.Fatalf("AddRecovery again: %+v, %v; want nothing to do", res, err)
	}
	st, err := e.store.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Recovery) != 1 || st.Recovery[0].IntermediateKeys != 2 || st.IntermediateKeys != 2 || st.Recovery[0].Provider != "local" {
		t.Fatalf("status recovery: %+v of %d", st.Recovery, st.IntermediateKeys)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.recovery.add'`); n != 2 {
		t.Fatalf("%d ik.recovery.add events, want 2", n)
	}

	lose()
	lost := newStore(t, e.pool, pgstore.Config{KEK: newPrimary})
	if _, err := lost.Get(ctx, "p1", "s0"); err == nil {
		t.Fatal("read with the primary KEK lost succeeded")
	}
	// Another recovery key has no wrap: nothing changes.
	if _, err := lost.Recover(ctx, newKEK(t, "other")); !errors.Is(err, hierarchy.ErrNoRecoveryWrap) {
		t.Fatalf("Recover with a key that has no wrap: %v, want ErrNoRecoveryWrap", err)
	}
	rr, err := lost.Recover(ctx, rec)
	if err != nil || rr.Done != 2 || rr.DirectDataKeys != 0 {
		t.Fatalf("Recover: %+v, %v; want 2 recovered", rr, err)
	}
	if rr, err := lost.Recover(ctx, rec); err != nil || rr.Done != 0 || rr.Already != 2 {
		t.Fatalf("Recover again: %+v, %v; want nothing to do", rr, err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.recover'`); n != 2 {
		t.Fatalf("%d ik.recover events, want 2", n)
	}
	fresh := newStore(t, e.pool, pgstore.Config{KEK: newPrimary})
	for k, v := range want {
		mustGet(t, fresh, k.project, k.name, v)
	}
	// The recovered deployment works on: a new project, a rotation.
	mustPut(t, fresh, "p3", "s", "v")
	if _, err := fresh.RotateIntermediate(ctx); err != nil {
		t.Fatal(err)
	}
	mustPut(t, newStore(t, e.pool, pgstore.Config{KEK: newPrimary}), "p4", "s", "v")
}

// The drill of issue #16: secrets under Vault with a local recovery
// keyring; the Vault transit key deleted; recovered onto a new Vault key.
func TestRecoveryDrillVaultKeyDeleted(t *testing.T) {
	ctx := context.Background()
	v := startVault(t)
	oldURL, newURL := vaultKey(t, v, "deployment"), vaultKey(t, v, "deployment-new")
	primary, err := provider.Open(ctx, oldURL)
	if err != nil {
		t.Fatal(err)
	}
	next, err := provider.Open(ctx, newURL)
	if err != nil {
		t.Fatal(err)
	}
	recoveryDrill(t, primary, func() {
		if _, err := v.Root.Logical().Write("transit/keys/deployment/config", map[string]any{"deletion_allowed": true}); err != nil {
			t.Fatal(err)
		}
		if _, err := v.Root.Logical().Delete("transit/keys/deployment"); err != nil {
			t.Fatal(err)
		}
	}, keyring(t, next, primary))
}

// The same with the primary a local-kms key scheduled for deletion (KMS
// refuses it as disabled: KMSInvalidStateException).
func TestRecoveryDrillKMSKeyPendingDeletion(t *testing.T) {
	ctx := context.Background()
	s := localKMS(t)
	oldARN, newARN := kmsKey(t, s), kmsKey(t, s)
	primary, err := provider.Open(ctx, s.URL(oldARN))
	if err != nil {
		t.Fatal(err)
	}
	next, err := provider.Open(ctx, s.URL(newARN))
	if err != nil {
		t.Fatal(err)
	}
	recoveryDrill(t, primary, func() {
		if _, err := s.Admin.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(oldARN), PendingWindowInDays: aws.Int32(7)}); err != nil {
			t.Fatal(err)
		}
	}, keyring(t, next, primary)) // the old key stays in the keyring, as an operator would keep it: KMS answers "disabled"
}

// A data key of an unbound project under a lost KEK directly (no
// intermediate key) is counted, not recovered.
func TestRecoverCountsDirectDataKeys(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	mustPut(t, e.store, "p", "s", "v")
	if _, err := e.store.AddRecovery(ctx, newKEK(t, "r")); !errors.Is(err, pgstore.ErrNotSupported) {
		t.Fatalf("AddRecovery with DirectKEK: %v, want ErrNotSupported", err)
	}
	s := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	rec := newKEK(t, "r")
	if _, err := s.AddRecovery(ctx, rec); err != nil {
		t.Fatal(err)
	}
	rr, err := newStore(t, e.pool, pgstore.Config{KEK: newKEK(t, "new")}).Recover(ctx, rec)
	if err != nil || rr.DirectDataKeys != 1 {
		t.Fatalf("Recover: %+v, %v; want 1 data key directly under the lost KEK", rr, err)
	}
	_, err = newStore(t, e.pool, pgstore.Config{KEK: newKEK(t, "new")}).Get(ctx, "p", "s")
	if !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("get of a data key under the lost KEK: %v, want ErrDecrypt", err)
	}
}
