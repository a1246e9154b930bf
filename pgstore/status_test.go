package pgstore_test

import (
	"context"
	"testing"

	"github.com/profullstack/keybroker/pgstore"
)

func TestStatus(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{Budget: 100, ReserveChunk: 10, DirectKEK: true})
	s := e.store
	st, err := s.Status(ctx)
	if err != nil || len(st.Versions) != 0 || st.OldestInUse != nil || st.Secrets != 0 {
		t.Fatalf("empty: %+v, %v", st, err)
	}
	putMany(t, s, 3, 4)
	if _, err := s.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "new", "n", []byte("v")); err != nil { // a data key under version 2
		t.Fatal(err)
	}
	st, err = s.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Versions) != 2 || st.Versions[0].Version != "1" || st.Versions[0].DataKeys != 3 || st.Versions[0].Secrets != 12 ||
		st.Versions[1].Version != "2" || st.Versions[1].DataKeys != 1 || st.Versions[1].Secrets != 1 {
		t.Fatalf("versions: %+v", st.Versions)
	}
	if st.OldestInUse == nil || st.OldestInUse.Version != "1" {
		t.Fatalf("oldest in use: %+v", st.OldestInUse)
	}
	if st.Secrets != 13 || st.Projects != 4 || st.DataKeys["active"] != 4 || st.Budget != 100 || st.MaxActiveUse != 10 {
		t.Fatalf("status: %+v", st)
	}
	if _, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	st, _ = s.Status(ctx)
	if st.OldestInUse == nil || st.OldestInUse.Version != "2" || st.Versions[0].DataKeys != 0 {
		t.Fatalf("after rewrap: %+v", st)
	}
}
