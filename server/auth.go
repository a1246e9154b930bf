package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// authenticator verifies bearer tokens against service_tokens, keeping
// rows it found for Config.TokenRecheck, and owns each token's rate
// limiter.
type authenticator struct {
	tokens  *Tokens
	recheck time.Duration
	limit   rate.Limit
	burst   int
	now     func() time.Time

	mu   sync.Mutex
	rows map[[tokenIDLen]byte]*entry
}

type entry struct {
	row     *tokenRow
	limiter *rate.Limiter
}

// dummyHash is compared against when no row has the presented id, so an
// unknown id costs the same hashing and comparing as a wrong secret.
var dummyHash = sha256.Sum256([]byte("keybroker/token/absent"))

// authResult is what authenticate decided.
type authResult int

const (
	authOK authResult = iota
	authBad
	authLimited
	authUnavailable
)

// authenticate returns the token row for the request's Authorization
// header. Every way a token can be wrong (missing, malformed, unknown id,
// wrong secret, revoked, expired) is the one result authBad.
func (a *authenticator) authenticate(ctx context.Context, r *http.Request) (*tokenRow, authResult) {
	h := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		return nil, authBad
	}
	id, secret, ok := parseToken(tok)
	defer clear(secret[:])
	if !ok {
		return nil, authBad
	}
	e, err := a.entry(ctx, id)
	if err != nil {
		return nil, authUnavailable
	}
	if e == nil {
		h := sha256.Sum256(secret[:])
		subtle.ConstantTimeCompare(h[:], dummyHash[:])
		return nil, authBad
	}
	row := e.row
	if !row.matches(&secret) || row.revoked || !a.now().Before(row.expires) {
		return nil, authBad
	}
	if !e.limiter.Allow() {
		return row, authLimited
	}
	return row, authOK
}

// entry returns the cached entry for id, reading the row again when it is
// older than recheck; nil when no row has the id. Only ids that exist in
// the table are kept, so the map is bounded by the table's size.
func (a *authenticator) entry(ctx context.Context, id [tokenIDLen]byte) (*entry, error) {
	now := a.now()
	a.mu.Lock()
	e := a.rows[id]
	a.mu.Unlock()
	if e != nil && now.Sub(e.row.fetched) < a.recheck {
		return e, nil
	}
	row, found, err := a.tokens.lookup(ctx, id)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !found {
		delete(a.rows, id)
		return nil, nil
	}
	row.fetched = now
	if e = a.rows[id]; e != nil {
		e = &entry{row: row, limiter: e.limiter} // keep the token's rate budget
	} else {
		e = &entry{row: row, limiter: rate.NewLimiter(a.limit, a.burst)}
	}
	a.rows[id] = e
	return e, nil
}
