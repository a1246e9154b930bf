package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestSecretsFlow(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.token([]string{"p1"}, OpRead, OpWrite)
	name := "webhooks/stripe secret" // a slash and a space: percent-encoded
	path := "/v1/projects/p1/secrets/" + url.PathEscape(name)
	if code, body := e.do("GET", path, tok, nil); code != http.StatusNotFound || !strings.Contains(string(body), `"not_found"`) {
		t.Fatalf("get before put: %d %s", code, body)
	}
	if code, body := e.do("PUT", path, tok, map[string]string{"value": b64("whsec_1")}); code != http.StatusNoContent {
		t.Fatalf("put: %d %s", code, body)
	}
	code, body := e.do("GET", path, tok, nil)
	var v valueResponse
	if code != http.StatusOK || json.Unmarshal(body, &v) != nil || string(v.Value) != "whsec_1" {
		t.Fatalf("get: %d %s", code, body)
	}
	// The store holds it under the decoded name.
	if got, err := e.store.Get(context.Background(), "p1", name); err != nil || string(got) != "whsec_1" {
		t.Fatalf("store get: %q %v", got, err)
	}
	if code, _ := e.do("PUT", "/v1/projects/p1/secrets/github", tok, map[string]string{"value": b64("ghp_2")}); code != http.StatusNoContent {
		t.Fatal(code)
	}
	code, body = e.do("POST", "/v1/projects/p1/get-many", tok, map[string][]string{"names": {name, "github", "absent"}})
	var many getManyResponse
	if code != http.StatusOK || json.Unmarshal(body, &many) != nil {
		t.Fatalf("get-many: %d %s", code, body)
	}
	if len(many.Values) != 2 || string(many.Values[name]) != "whsec_1" || string(many.Values["github"]) != "ghp_2" {
		t.Fatalf("get-many: %s", body)
	}
	code, body = e.do("GET", "/v1/projects/p1/secrets", tok, nil)
	var list listResponse
	if code != http.StatusOK || json.Unmarshal(body, &list) != nil || len(list.Secrets) != 2 || list.Secrets[0].Name != "github" || list.Secrets[1].Name != name {
		t.Fatalf("list: %d %s", code, body)
	}
	if code, _ := e.do("DELETE", path, tok, nil); code != http.StatusNoContent {
		t.Fatal(code)
	}
	if code, _ := e.do("DELETE", path, tok, nil); code != http.StatusNotFound {
		t.Fatal(code)
	}
	if code, _ := e.do("GET", path, tok, nil); code != http.StatusNotFound {
		t.Fatal(code)
	}

	// Every access is in the log, in order, with its outcome.
	rows, err := e.tokens.pool.Query(context.Background(), `SELECT operation, names, outcome FROM keybroker.access_log ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var (
			op, outcome string
			names       []string
		)
		if err := rows.Scan(&op, &names, &outcome); err != nil {
			t.Fatal(err)
		}
		got = append(got, op+" "+strings.Join(names, ",")+" "+outcome)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	want := []string{
		"get " + name + " not_found", "put " + name + " ok", "get " + name + " ok", "put github ok",
		"getmany " + name + ",github,absent ok", "list  ok",
		"delete " + name + " ok", "delete " + name + " not_found", "get " + name + " not_found",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("access log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// A request outside the token's scope gets one answer, 403, whether or not
// the secret exists, and nothing is read.
func TestScopeNoExistenceOracle(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	if err := e.store.Put(ctx, "other", "exists", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Put(ctx, "mine", "exists", []byte("v")); err != nil {
		t.Fatal(err)
	}
	reader := e.token([]string{"mine"}, OpRead)
	var first []byte
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/projects/other/secrets/exists"},
		{"GET", "/v1/projects/other/secrets/missing"},
		{"GET", "/v1/projects/other/secrets"},
		{"POST", "/v1/projects/other/get-many"},
		{"PUT", "/v1/projects/mine/secrets/exists"},
		{"PUT", "/v1/projects/mine/secrets/missing"},
		{"DELETE", "/v1/projects/mine/secrets/exists"},
	} {
		code, body := e.do(c.method, c.path, reader, `{"names":["exists"]}`)
		if code != http.StatusForbidden {
			t.Errorf("%s %s: %d %s", c.method, c.path, code, body)
		}
		if first == nil {
			first = body
		} else if !bytes.Equal(body, first) {
			t.Errorf("%s %s: body %s differs from %s", c.method, c.path, body, first)
		}
	}
	if v, err := e.store.Get(ctx, "mine", "exists"); err != nil || string(v) != "v" {
		t.Fatalf("a refused delete changed the secret: %q %v", v, err)
	}
	var refused int
	if err := e.tokens.pool.QueryRow(ctx, `SELECT count(*) FROM keybroker.access_log WHERE outcome = 'forbidden'`).Scan(&refused); err != nil || refused != 7 {
		t.Fatalf("forbidden rows %d %v", refused, err)
	}
}

// Every bad token gets the same 401 and body.
func TestBadTokensAlike(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.TokenRecheck = -1 })
	ctx := context.Background()
	good := e.token(nil, OpRead)
	revoked, info, err := e.tokens.Create(ctx, TokenSpec{Name: "revoked", Ops: []Op{OpRead}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.tokens.Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	wrongSecret := good[:len(good)-4] + "AAAA"
	if wrongSecret == good {
		wrongSecret = good[:len(good)-4] + "BBBB"
	}
	unknownID := TokenPrefix + "AAAAAAAAAAAAAAAAAAAAAA" + good[len(TokenPrefix)+22:]
	var first []byte
	for name, tok := range map[string]string{
		"none": "", "garbage": "x", "prefix only": TokenPrefix, "bad base64": good[:len(good)-1] + "!",
		"too long": good + "A", "unknown id": unknownID, "wrong secret": wrongSecret, "revoked": revoked,
	} {
		code, body := e.do("GET", "/v1/projects/p/secrets/s", tok, nil)
		if code != http.StatusUnauthorized {
			t.Errorf("%s: %d %s", name, code, body)
		}
		if first == nil {
			first = body
		} else if !bytes.Equal(first, body) {
			t.Errorf("%s: body %s differs from %s", name, body, first)
		}
	}
	if code, _ := e.do("GET", "/v1/projects/p/secrets/s", good, nil); code != http.StatusNotFound {
		t.Fatalf("good token: %d", code)
	}
	// Expired: the same token seen from after its expiry.
	e.srv.auth.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	if code, body := e.do("GET", "/v1/projects/p/secrets/s", good, nil); code != http.StatusUnauthorized || !bytes.Equal(body, first) {
		t.Fatalf("expired: %d %s", code, body)
	}
}

func TestRevokeTakesEffect(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.TokenRecheck = -1 })
	ctx := context.Background()
	tok, info, err := e.tokens.Create(ctx, TokenSpec{Name: "t", Ops: []Op{OpRead}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if code, _ := e.do("GET", "/v1/projects/p/secrets", tok, nil); code != http.StatusOK {
		t.Fatal(code)
	}
	if err := e.tokens.Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	if code, _ := e.do("GET", "/v1/projects/p/secrets", tok, nil); code != http.StatusUnauthorized {
		t.Fatalf("after revoke: %d", code)
	}
	if err := e.tokens.Revoke(ctx, "00000000000000000000000000000000"); !errors.Is(err, ErrTokenNotFound) {
		t.Fatal(err)
	}
	list, err := e.tokens.List(ctx)
	if err != nil || len(list) != 1 || list[0].RevokedAt == nil || list[0].Projects != nil || !slices.Equal(list[0].Ops, []Op{OpRead}) {
		t.Fatalf("list: %+v %v", list, err)
	}
}

func TestRateLimit(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Rate = 0.001; c.Burst = 2 })
	tok := e.token(nil, OpRead)
	for i, want := range []int{200, 200, 429, 429} {
		if code, _ := e.do("GET", "/v1/projects/p/secrets", tok, nil); code != want {
			t.Fatalf("request %d: %d, want %d", i, code, want)
		}
	}
	// Another token has its own budget.
	if code, _ := e.do("GET", "/v1/projects/p/secrets", e.token(nil, OpRead), nil); code != 200 {
		t.Fatal(code)
	}
}

func TestBadBodies(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxBody = 1024 })
	tok := e.token(nil, OpRead, OpWrite)
	put := "/v1/projects/p/secrets/s"
	for _, c := range []struct {
		path, body string
		code       int
	}{
		{put, "", 400},
		{put, "{", 400},
		{put, `{"value":"not base64!"}`, 400},
		{put, `{"value":1}`, 400},
		{put, `{"valu":"AA=="}`, 400},
		{put, `{}`, 400},
		{put, `{"value":"AA=="} {}`, 400},
		{put, `[]`, 400},
		{put, `{"value":"` + strings.Repeat("A", 2000) + `"}`, 413},
		{"/v1/projects/p/get-many", `{"names":null}`, 400},
		{"/v1/projects/p/get-many", `{"names":[""]}`, 400},
		{"/v1/projects/p/get-many", `{"names":["` + strings.Repeat("n\",\"", 300) + `"]}`, 413},
	} {
		method := "PUT"
		if strings.HasSuffix(c.path, "get-many") {
			method = "POST"
		}
		code, body := e.do(method, c.path, tok, c.body)
		if code != c.code {
			t.Errorf("%s %.40q: %d %s, want %d", method, c.body, code, body, c.code)
		}
	}
	if _, err := e.store.Get(context.Background(), "p", "s"); err == nil {
		t.Fatal("a bad body was stored")
	}
	if code, _ := e.do("GET", "/v1/projects/p/secrets/"+strings.Repeat("n", 1025), tok, nil); code != 400 {
		t.Fatalf("long name: %d", code)
	}
}

// Neither a token nor a value appears in the log output or an error body.
func TestNoSecretsLeak(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.token([]string{"p"}, OpRead, OpWrite)
	const value = "sk_live_DO_NOT_LEAK_4b1d"
	var bodies []string
	for _, c := range []struct{ method, path, body, token string }{
		{"PUT", "/v1/projects/p/secrets/s", `{"value":"` + b64(value) + `"}`, tok},
		{"PUT", "/v1/projects/other/secrets/s", `{"value":"` + b64(value) + `"}`, tok},
		{"PUT", "/v1/projects/p/secrets/s", `{"value":"` + value + `"}`, tok},
		{"PUT", "/v1/projects/p/secrets/s", `{"` + value + `":1}`, tok},
		{"PUT", "/v1/projects/p/secrets/s", value, tok},
		{"GET", "/v1/projects/p/secrets/s", "", tok[:len(tok)-1] + "x"},
		{"GET", "/v1/projects/p/secrets/s", "", tok + value},
	} {
		_, body := e.do(c.method, c.path, c.token, c.body)
		bodies = append(bodies, string(body))
	}
	secret := tok[len(TokenPrefix)+22:]
	all := e.logs.String() + strings.Join(bodies, "\n")
	for _, s := range []string{value, b64(value), tok, secret} {
		if strings.Contains(all, s) {
			t.Errorf("%q leaked:\n%s", s, all)
		}
	}
	if !strings.Contains(e.logs.String(), "status=204") {
		t.Fatalf("no request logged:\n%s", e.logs.String())
	}
}

// Every route the server serves is in the OpenAPI document, and every
// operation the document lists is served.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.Unmarshal(OpenAPI(), &doc); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("openapi %q", doc.OpenAPI)
	}
	var inDoc []string
	for path, ops := range doc.Paths {
		for method := range ops {
			if method == "parameters" {
				continue
			}
			inDoc = append(inDoc, strings.ToUpper(method)+" "+path)
		}
	}
	e := newEnv(t, func(c *Config) { c.Metrics = http.NotFoundHandler() })
	var served []string
	for _, rt := range e.srv.routes(Config{Metrics: http.NotFoundHandler()}) {
		served = append(served, rt.pattern)
	}
	slices.Sort(inDoc)
	slices.Sort(served)
	if !slices.Equal(inDoc, served) {
		t.Fatalf("document lists\n%s\nserver serves\n%s", strings.Join(inDoc, "\n"), strings.Join(served, "\n"))
	}
	code, body := e.do("GET", "/v1/openapi.json", "", nil)
	if code != 200 || !bytes.Equal(body, OpenAPI()) {
		t.Fatalf("served document: %d", code)
	}
	for _, p := range []string{"/livez", "/readyz"} {
		if code, body := e.do("GET", p, "", nil); code != 200 {
			t.Errorf("%s: %d %s", p, code, body)
		}
	}
	if code, _ := e.do("GET", "/v2/nothing", "", nil); code != 404 {
		t.Errorf("unknown route: %d", code)
	}
}

// Deleting a project needs admin; it shreds every secret, is logged, and
// later writes get 409.
func TestDeleteProject(t *testing.T) {
	e := newEnv(t, nil)
	writer := e.token([]string{"p"}, OpRead, OpWrite)
	admin := e.token([]string{"p"}, OpAdmin)
	for _, n := range []string{"a", "b"} {
		if code, body := e.do("PUT", "/v1/projects/p/secrets/"+n, writer, map[string]string{"value": b64("v")}); code != 204 {
			t.Fatalf("put: %d %s", code, body)
		}
	}
	if code, _ := e.do("DELETE", "/v1/projects/p", writer, nil); code != http.StatusForbidden {
		t.Fatalf("delete project without admin: %d", code)
	}
	code, body := e.do("DELETE", "/v1/projects/p", admin, nil)
	var res shredResponse
	if code != 200 || json.Unmarshal(body, &res) != nil || res.Secrets != 2 || res.DataKeys != 1 {
		t.Fatalf("delete project: %d %s", code, body)
	}
	if code, _ := e.do("GET", "/v1/projects/p/secrets/a", writer, nil); code != 404 {
		t.Fatalf("get after shred: %d", code)
	}
	if code, body := e.do("PUT", "/v1/projects/p/secrets/a", writer, map[string]string{"value": b64("v")}); code != http.StatusConflict || !strings.Contains(string(body), "project_deleted") {
		t.Fatalf("put after shred: %d %s", code, body)
	}
	var outcomes []string
	rows, err := e.tokens.pool.Query(context.Background(), `SELECT outcome FROM keybroker.access_log WHERE operation = 'shred' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var o string
		rows.Scan(&o)
		outcomes = append(outcomes, o)
	}
	if !slices.Equal(outcomes, []string{"forbidden", "started", "ok"}) {
		t.Fatalf("shred log rows: %v", outcomes)
	}
}

// Seal and open bytes the application stores itself: bound to project,
// table, column and row; scoped by the seal and open operations.
func TestSealOpen(t *testing.T) {
	e := newEnv(t, nil)
	sealer := e.token([]string{"p"}, OpSeal, OpOpen)
	reader := e.token([]string{"p"}, OpRead)
	ref := map[string]any{"table": "public.secrets", "column": "value_encrypted", "row": []string{"stripe"}}
	with := func(k string, v any) map[string]any {
		m := map[string]any{}
		for a, b := range ref {
			m[a] = b
		}
		m[k] = v
		return m
	}
	code, body := e.do("POST", "/v1/projects/p/seal", sealer, with("value", []byte("whsec_col")))
	var sr sealResponse
	if code != 200 || json.Unmarshal(body, &sr) != nil || bytes.Contains(sr.Sealed, []byte("whsec_col")) {
		t.Fatalf("seal: %d %s", code, body)
	}
	code, body = e.do("POST", "/v1/projects/p/open", sealer, with("sealed", sr.Sealed))
	var v valueResponse
	if code != 200 || json.Unmarshal(body, &v) != nil || string(v.Value) != "whsec_col" {
		t.Fatalf("open: %d %s", code, body)
	}
	code, body = e.do("POST", "/v1/projects/p/open-many", sealer, map[string]any{"items": []any{with("sealed", sr.Sealed), with("sealed", sr.Sealed)}})
	var om openManyResponse
	if code != 200 || json.Unmarshal(body, &om) != nil || len(om.Values) != 2 || string(om.Values[1]) != "whsec_col" {
		t.Fatalf("open-many: %d %s", code, body)
	}
	// Another row: does not open.
	other := with("sealed", sr.Sealed)
	other["row"] = []string{"github"}
	if code, body := e.do("POST", "/v1/projects/p/open", sealer, other); code != 400 || !strings.Contains(string(body), "decrypt_failed") {
		t.Fatalf("open for another row: %d %s", code, body)
	}
	if code, _ := e.do("POST", "/v1/projects/p/seal", reader, with("value", []byte("x"))); code != 403 {
		t.Fatalf("seal without the seal operation: %d", code)
	}
	if code, _ := e.do("POST", "/v1/projects/p/open", reader, with("sealed", sr.Sealed)); code != 403 {
		t.Fatalf("open without the open operation: %d", code)
	}
	if code, _ := e.do("POST", "/v1/projects/p/seal", sealer, map[string]any{"table": "", "column": "c", "row": []string{"r"}, "value": []byte("x")}); code != 400 {
		t.Fatalf("seal with an empty table: %d", code)
	}
}
