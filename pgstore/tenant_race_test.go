package pgstore_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/pgstore"
)

// Writers keep writing to a project (data keys turning over every 20
// encryptions) while it is bound, unbound and rebound, rewrapped and
// re-encrypted: no Put fails, and every name reads back. (The multi-process
// version is internal/soak's TestSoak/tenant.)
func TestProjectKEKRebindUnderWriters(t *testing.T) {
	ctx := context.Background()
	kmsS := localKMS(t)
	url := kmsS.URL(kmsKey(t, kmsS))
	e := newEnv(t, pgstore.Config{Budget: 20, ReserveChunk: 5})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 100)
	for w := range 3 {
		s := newStore(t, e.pool, pgstore.Config{KEK: e.kek, Budget: 20, ReserveChunk: 5})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := s.Put(ctx, "p", fmt.Sprintf("w%d-%d", w, i%5), []byte("v")); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	op := newStore(t, e.pool, pgstore.Config{KEK: e.kek, Budget: 20, ReserveChunk: 5})
	for i := range 10 {
		if i%2 == 0 {
			if _, err := op.SetProjectKEK(ctx, "p", url); err != nil {
				t.Fatal(err)
			}
		} else if err := op.UnsetProjectKEK(ctx, "p"); err != nil {
			t.Fatal(err)
		}
		if _, err := op.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := op.Reencrypt(ctx, "p", pgstore.ReencryptOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	for w := range 3 {
		for i := range 5 {
			mustGet(t, fresh, "p", fmt.Sprintf("w%d-%d", w, i), "v")
		}
	}
}
