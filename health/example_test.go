package health_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"

	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/provider/local"
)

// A readiness probe on /readyz. With a pgstore.Store, set Config.Store too.
func Example() {
	kek, err := local.Generate("meshhook")
	if err != nil {
		log.Fatal(err)
	}
	checker, err := health.New(health.Config{KEK: kek})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /readyz", checker)

	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	fmt.Println(rec.Code)

	r, err := checker.Check(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(r.Status, r.Providers[0].Backend, r.Providers[0].PrimaryVersion)
	// Output:
	// 200
	// ok local 1
}
