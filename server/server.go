package server

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"golang.org/x/time/rate"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// Sentinel errors; test with errors.Is.
var (
	// ErrInvalidArgument: a Config, TokenSpec, token id or Options field is
	// out of range or malformed.
	ErrInvalidArgument = errors.New("server: invalid argument")
	// ErrTokenNotFound: no token has that id.
	ErrTokenNotFound = errors.New("server: token not found")
	// ErrPlaintext: Options asks for plain HTTP on an address that is not
	// loopback without Options.AllowPlaintext.
	ErrPlaintext = errors.New("server: plain HTTP outside loopback needs AllowPlaintext")
)

// Defaults for Config fields left zero.
const (
	// DefaultMaxBody bounds a request body: a MaxValueLen (1 MiB) value in
	// base64 plus its JSON.
	DefaultMaxBody = 2 << 20
	// DefaultTokenRecheck is how long a token's row is trusted before it is
	// read again: a revoked token stops working within it.
	DefaultTokenRecheck = time.Second
	// DefaultRate and DefaultBurst are each token's request rate limit
	// (requests per second) and burst.
	DefaultRate  = 1000
	DefaultBurst = 1000
	// DefaultOpTimeout bounds the store and access-log work of one request.
	DefaultOpTimeout = 30 * time.Second
)

// Config configures a Server.
type Config struct {
	// Store serves the secrets. Required.
	Store *pgstore.Store
	// Pool is the Store's pool (or one on the same database): the server
	// reads service_tokens and writes access_log in Store's schema through
	// it, and runs each write in a transaction of it with its access_log
	// row. At most MaxConns-1 such transactions are open at once (one
	// connection stays free for data key reservations), so MaxConns bounds
	// concurrent writes; at least 2. The access log's statements use at
	// most 3 connections at once (two flushers' batches and a lone row).
	// Required.
	Pool *pgxpool.Pool
	// Ready serves GET /readyz (a *health.Checker). Required.
	Ready http.Handler
	// Metrics, when set, serves GET /metrics (for example the Prometheus
	// exporter's handler), unauthenticated like the health probes.
	Metrics http.Handler
	// MeterProvider records the server's own metrics
	// (keybroker.http.requests, keybroker.http.duration); the global one
	// when nil.
	MeterProvider metric.MeterProvider
	// Logger gets one line per request (method, route pattern, status,
	// token id, duration; never a value, a token or a header) and the
	// server's errors. Discarded when nil.
	Logger *slog.Logger
	// MaxBody bounds a request body in bytes (DefaultMaxBody when zero).
	MaxBody int64
	// TokenRecheck: how long a token's row is reused before it is read
	// again (DefaultTokenRecheck when zero; negative: on every request).
	TokenRecheck time.Duration
	// Rate and Burst: each token's rate limit in requests per second and
	// its burst (DefaultRate and DefaultBurst when zero). Requests over it
	// get 429.
	Rate  float64
	Burst int
	// OpTimeout bounds the store and access-log work of one request
	// (DefaultOpTimeout when zero). It runs detached from the client's
	// connection, so a client that hangs up mid-write does not cut the
	// write short.
	OpTimeout time.Duration
}

// Server is keybroker's HTTP API. It is an http.Handler; Serve runs it
// with TLS, timeouts and graceful shutdown.
type Server struct {
	store   *pgstore.Store
	auth    *authenticator
	audit   *auditor
	log     *slog.Logger
	maxBody int64
	timeout time.Duration
	mux     *http.ServeMux

	requests metric.Int64Counter
	duration metric.Float64Histogram
}

// New returns a Server. It does not take ownership of the Store or pool.
// It starts the goroutines that write the access log; Close stops them.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Store == nil:
		return nil, fmt.Errorf("%w: nil Store", ErrInvalidArgument)
	case cfg.Pool == nil:
		return nil, fmt.Errorf("%w: nil Pool", ErrInvalidArgument)
	case cfg.Ready == nil:
		return nil, fmt.Errorf("%w: nil Ready handler", ErrInvalidArgument)
	case cfg.MaxBody < 0 || cfg.Rate < 0 || cfg.Burst < 0 || cfg.OpTimeout < 0:
		return nil, fmt.Errorf("%w: negative MaxBody, Rate, Burst or OpTimeout", ErrInvalidArgument)
	}
	tokens, err := NewTokens(cfg.Pool, cfg.Store.Schema())
	if err != nil {
		return nil, err
	}
	conns := cfg.Pool.Config().MaxConns
	if conns < 2 {
		return nil, fmt.Errorf("%w: the pool needs at least 2 connections (a write's transaction and its data key reservation), has %d", ErrInvalidArgument, conns)
	}
	s := &Server{
		store:   cfg.Store,
		log:     cfg.Logger,
		maxBody: orDefault(cfg.MaxBody, DefaultMaxBody),
		timeout: orDefault(cfg.OpTimeout, DefaultOpTimeout),
		auth: &authenticator{
			tokens:  tokens,
			recheck: orDefault(cfg.TokenRecheck, DefaultTokenRecheck),
			limit:   rate.Limit(orDefault(cfg.Rate, DefaultRate)),
			burst:   orDefault(cfg.Burst, DefaultBurst),
			now:     time.Now,
			rows:    map[[tokenIDLen]byte]*entry{},
		},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	mp := cfg.MeterProvider
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	meter := mp.Meter(ScopeName)
	if s.requests, err = meter.Int64Counter(MetricRequests, metric.WithDescription("HTTP requests by route and status code")); err != nil {
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	if s.duration, err = meter.Float64Histogram(MetricDuration, metric.WithUnit("s"), metric.WithDescription("HTTP request duration by route")); err != nil {
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	// Last, so that no error return leaves the flushers running.
	s.audit = &auditor{tokens: tokens, writers: make(chan struct{}, conns-1), log: newLogBatcher(cfg.Pool, tokens.q, s.timeout)}
	s.mux = http.NewServeMux()
	for _, rt := range s.routes(cfg) {
		s.mux.Handle(rt.pattern, s.instrument(rt.pattern, rt.handler))
	}
	s.mux.Handle("/", s.instrument("other", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "no such route")
	})))
	return s, nil
}

// Metric names and the meter's scope.
const (
	ScopeName      = "github.com/profullstack/keybroker/server"
	MetricRequests = "keybroker.http.requests" // counter: by http.route, http.response.status_code
	MetricDuration = "keybroker.http.duration" // histogram (s): by http.route
)

func orDefault[T int | int64 | float64 | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

//go:embed openapi.json
var openAPI []byte

// OpenAPI returns the OpenAPI 3 document describing the API (served at
// GET /v1/openapi.json).
func OpenAPI() []byte { return append([]byte(nil), openAPI...) }

type route struct {
	pattern string
	handler http.Handler
}

// routes lists every route; the OpenAPI document lists the same (a test
// holds them to it).
func (s *Server) routes(cfg Config) []route {
	rs := []route{
		{"GET /livez", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"status":"ok"}`+"\n")
		})},
		{"GET /readyz", cfg.Ready},
		{"GET /v1/openapi.json", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Write(openAPI)
		})},
		{"GET /v1/projects/{project}/secrets", s.authed(OpRead, "list", s.list)},
		{"POST /v1/projects/{project}/get-many", s.authed(OpRead, "getmany", s.getMany)},
		{"GET /v1/projects/{project}/secrets/{name}", s.authed(OpRead, "get", s.get)},
		{"PUT /v1/projects/{project}/secrets/{name}", s.authed(OpWrite, "put", s.put)},
		{"DELETE /v1/projects/{project}/secrets/{name}", s.authed(OpWrite, "delete", s.delete)},
		{"DELETE /v1/projects/{project}", s.authed(OpAdmin, "shred", s.shred)},
		{"POST /v1/projects/{project}/seal", s.authed(OpSeal, "seal", s.seal)},
		{"POST /v1/projects/{project}/open", s.authed(OpOpen, "open", s.open)},
		{"POST /v1/projects/{project}/open-many", s.authed(OpOpen, "openmany", s.openMany)},
	}
	if cfg.Metrics != nil {
		rs = append(rs, route{"GET /metrics", cfg.Metrics})
	}
	return rs
}

// Close flushes the access-log rows still queued (their requests then get
// their answers) and stops the goroutines that write them; afterwards a
// request that needs an access-log row gets 503. Call it after Serve has
// returned (every in-flight request has been answered) and before the
// pool is closed. It does not close the Store or the pool. Calling it more
// than once is harmless.
func (s *Server) Close() error {
	s.audit.log.close()
	return nil
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// statusWriter remembers the status code for metrics and the log line.
type statusWriter struct {
	http.ResponseWriter
	code  int
	token string
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// instrument records each request under its route pattern (a fixed set),
// never its path, which names projects and secrets.
func (s *Server) instrument(pattern string, h http.Handler) http.Handler {
	routeAttr := attribute.String("http.route", pattern)
	durOpt := metric.WithAttributeSet(attribute.NewSet(routeAttr))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		w.Header().Set("Cache-Control", "no-store")
		h.ServeHTTP(sw, r)
		if sw.code == 0 {
			sw.code = http.StatusOK
		}
		d := time.Since(start)
		ctx := context.WithoutCancel(r.Context())
		s.requests.Add(ctx, 1, metric.WithAttributes(routeAttr, attribute.Int("http.response.status_code", sw.code)))
		s.duration.Record(ctx, d.Seconds(), durOpt)
		s.log.LogAttrs(ctx, slog.LevelInfo, "request", slog.String("method", r.Method), slog.String("route", pattern),
			slog.Int("status", sw.code), slog.String("token", sw.token), slog.Duration("duration", d))
	})
}

// request is what an authenticated handler gets.
type request struct {
	tok     *tokenRow
	project string
	op      string // the access_log operation
	ctx     context.Context
}

// authed authenticates the request, checks the token's scope for op and
// the path's project, and calls h. Every bad token gets the same 401;
// every request outside the token's scope the same 403, before anything
// is read (so a 403 says nothing about what exists). Refusals of a valid
// token are written to the access log.
func (s *Server) authed(op Op, logOp string, h func(http.ResponseWriter, *http.Request, *request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, res := s.auth.authenticate(r.Context(), r)
		switch res {
		case authBad:
			w.Header().Set("WWW-Authenticate", `Bearer realm="keybroker"`)
			writeError(w, http.StatusUnauthorized, "unauthorized", "missing, malformed, unknown, revoked or expired token")
			return
		case authUnavailable:
			writeError(w, http.StatusServiceUnavailable, "unavailable", "token store unavailable")
			return
		}
		if sw, ok := w.(*statusWriter); ok {
			sw.token = tok.idHex
		}
		if res == authLimited {
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusTooManyRequests, "rate_limited", "token over its request rate")
			return
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.timeout)
		defer cancel()
		req := &request{tok: tok, project: r.PathValue("project"), op: logOp, ctx: ctx}
		if !tok.allows(op, req.project) {
			if err := s.audit.record(ctx, tok, req.project, nil, logOp, outcomeForbidden); err != nil {
				s.log.Error("access log", "err", err)
			}
			writeError(w, http.StatusForbidden, "forbidden", "token not allowed this operation on this project")
			return
		}
		h(w, r, req)
	})
}

type errorBody struct {
	Error   string `json:"error"`
	Message string `json:"message"`
}

// writeError sends a JSON error. code and message are fixed strings or
// pgstore's argument errors, which never carry values or tokens.
func writeError(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(errorBody{Error: code, Message: message})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// decode reads exactly one JSON object into v, bounded by MaxBody.
// It returns false after answering 400 or 413.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, s.maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if dec.Decode(&struct{}{}) != io.EOF {
			err = errTrailing
		}
	}
	if err == nil {
		return true
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, "too_large", "request body over "+strconv.FormatInt(s.maxBody, 10)+" bytes")
	default:
		// json's messages can quote a byte of the body; say only what kind
		// of problem it is.
		writeError(w, http.StatusBadRequest, "invalid_request", bodyProblem(err))
	}
	return false
}

var errTrailing = errors.New("trailing data")

func bodyProblem(err error) string {
	var (
		syn *json.SyntaxError
		typ *json.UnmarshalTypeError
	)
	switch {
	case errors.Is(err, io.EOF):
		return "request body is empty"
	case errors.Is(err, errTrailing):
		return "request body has data after its JSON object"
	case errors.As(err, &syn), errors.Is(err, io.ErrUnexpectedEOF):
		return "request body is not valid JSON"
	case errors.As(err, &typ):
		if typ.Field != "" {
			return "request body field " + strconv.Quote(typ.Field) + " has the wrong type"
		}
		return "request body is not a JSON object"
	default:
		// Unknown fields and bad base64 (whose messages name a field of
		// the caller's own body or an offset).
		return "request body has an unknown field or a value that is not standard base64"
	}
}

// storeError answers for an error of the store.
func (s *Server) storeError(w http.ResponseWriter, req *request, err error) {
	switch {
	case errors.Is(err, pgstore.ErrNotFound):
		writeError(w, http.StatusNotFound, "not_found", "no such secret")
	case errors.Is(err, pgstore.ErrInvalidArgument):
		writeError(w, http.StatusBadRequest, "invalid_request", argMessage(err))
	case errors.Is(err, pgstore.ErrProjectShredded):
		writeError(w, http.StatusConflict, "project_deleted", "the project was deleted (shredded); it takes no new secrets until reopened")
	case errors.Is(err, envelope.ErrDecrypt):
		s.log.Error("decrypt failed", "operation", req.op, "token", req.tok.idHex)
		writeError(w, http.StatusInternalServerError, "decrypt_failed", "stored value does not decrypt")
	case errors.Is(err, provider.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		s.log.Error("store", "operation", req.op, "err", err)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "key service or database unavailable")
	default:
		s.log.Error("store", "operation", req.op, "err", err)
		writeError(w, http.StatusInternalServerError, "internal", "internal error")
	}
}

// argMessage is pgstore's argument error without its package prefix: it
// names the bound broken, never a value.
func argMessage(err error) string {
	msg := err.Error()
	m, _ := strings.CutPrefix(msg, pgstore.ErrInvalidArgument.Error()+": ")
	return m
}

// logged records req's access-log row for names, with err's outcome (by
// outcome, which maps nil to outcomeOK), before anything is sent, so that
// no value leaves without its row; then it answers a failure: 503 when
// the row could not be written, else fail's answer for err. It reports
// whether the caller is to send its own (success) answer.
func (s *Server) logged(w http.ResponseWriter, req *request, names []string, err error, outcome func(error) string, fail func(http.ResponseWriter, *request, error)) bool {
	if aerr := s.audit.record(req.ctx, req.tok, req.project, names, req.op, outcome(err)); aerr != nil {
		s.auditFailed(w, aerr)
		return false
	}
	if err != nil {
		fail(w, req, err)
		return false
	}
	return true
}

// auditFailed answers when the access log cannot be written: the request
// is refused rather than served unrecorded.
func (s *Server) auditFailed(w http.ResponseWriter, err error) {
	s.log.Error("access log", "err", err)
	writeError(w, http.StatusServiceUnavailable, "unavailable", "access log unavailable")
}

type valueBody struct {
	Value *[]byte `json:"value"`
}

type valueResponse struct {
	Value []byte `json:"value"`
}

func (s *Server) get(w http.ResponseWriter, r *http.Request, req *request) {
	name := r.PathValue("name")
	v, err := s.store.Get(req.ctx, req.project, name)
	defer clear(v)
	if s.logged(w, req, []string{name}, err, classify, s.storeError) {
		writeJSON(w, valueResponse{Value: v})
	}
}

type getManyBody struct {
	Names []string `json:"names"`
}

type getManyResponse struct {
	Values map[string][]byte `json:"values"`
}

func (s *Server) getMany(w http.ResponseWriter, r *http.Request, req *request) {
	var body getManyBody
	if !s.decode(w, r, &body) {
		return
	}
	if body.Names == nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "names is required")
		return
	}
	if len(body.Names) > pgstore.MaxGetMany {
		writeError(w, http.StatusBadRequest, "invalid_request", fmt.Sprintf("%d names, more than %d", len(body.Names), pgstore.MaxGetMany))
		return
	}
	vals, err := s.store.GetMany(req.ctx, req.project, body.Names)
	defer func() {
		for _, v := range vals {
			clear(v)
		}
	}()
	if s.logged(w, req, body.Names, err, classify, s.storeError) {
		writeJSON(w, getManyResponse{Values: vals})
	}
}

type listResponse struct {
	Secrets []secretInfo `json:"secrets"`
}

type secretInfo struct {
	Name      string    `json:"name"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

func (s *Server) list(w http.ResponseWriter, _ *http.Request, req *request) {
	infos, err := s.store.List(req.ctx, req.project)
	if !s.logged(w, req, nil, err, classify, s.storeError) {
		return
	}
	out := listResponse{Secrets: make([]secretInfo, len(infos))}
	for i, si := range infos {
		out.Secrets[i] = secretInfo{Name: si.Name, CreatedAt: si.CreatedAt, UpdatedAt: si.UpdatedAt}
	}
	writeJSON(w, out)
}

func (s *Server) put(w http.ResponseWriter, r *http.Request, req *request) {
	var body valueBody
	if !s.decode(w, r, &body) {
		return
	}
	if body.Value == nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "value is required")
		return
	}
	defer clear(*body.Value)
	name := r.PathValue("name")
	s.write(w, req, []string{name}, func(st *pgstore.Store) error { return st.Put(req.ctx, req.project, name, *body.Value) })
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request, req *request) {
	name := r.PathValue("name")
	s.write(w, req, []string{name}, func(st *pgstore.Store) error { return st.Delete(req.ctx, req.project, name) })
}

// write makes a write in one transaction with its access-log row.
func (s *Server) write(w http.ResponseWriter, req *request, names []string, do func(*pgstore.Store) error) {
	err := s.audit.write(req.ctx, s.store, req.tok, req.project, names, req.op, do)
	switch {
	case errors.Is(err, errAuditFailed):
		s.auditFailed(w, err)
	case err != nil:
		s.storeError(w, req, err)
	default:
		w.WriteHeader(http.StatusNoContent)
	}
}

type shredResponse struct {
	DataKeys int64 `json:"data_keys"`
	Secrets  int64 `json:"secrets"`
}

// shred deletes (crypto-shreds) the project: pgstore's ShredProject, one
// transaction of its own with its project.shred event in key_events. It
// cannot join a transaction, so the access log gets a "started" row
// committed before it and the outcome's row after it.
func (s *Server) shred(w http.ResponseWriter, _ *http.Request, req *request) {
	if err := s.audit.record(req.ctx, req.tok, req.project, nil, req.op, outcomeStarted); err != nil {
		s.auditFailed(w, err)
		return
	}
	res, err := s.store.ShredProject(req.ctx, req.project)
	if aerr := s.audit.record(req.ctx, req.tok, req.project, nil, req.op, classify(err)); aerr != nil {
		// The shred's fate is settled (and in key_events); say so in the log.
		s.log.Error("access log", "err", aerr)
	}
	if err != nil {
		s.storeError(w, req, err)
		return
	}
	writeJSON(w, shredResponse{DataKeys: res.DataKeys, Secrets: res.Secrets})
}

func classify(err error) string {
	switch {
	case err == nil:
		return outcomeOK
	case errors.Is(err, pgstore.ErrNotFound):
		return outcomeNotFound
	case errors.Is(err, pgstore.ErrInvalidArgument):
		return outcomeInvalid
	default:
		return outcomeError
	}
}
