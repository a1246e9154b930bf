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

// dummyCertHash stands in for the certificate fingerprint of a token that
// is not bound (or does not exist), so every token costs one compare.
var dummyCertHash = sha256.Sum256([]byte("keybroker/token/unbound"))

// peerCert returns the SHA-256 of the DER of the connection's verified
// leaf client certificate, and false when there is none: plain HTTP, TLS
// without a client CA (Options.ClientCAFile), or a certificate the
// handshake did not verify. Only VerifiedChains count: a certificate the
// server did not check against its CAs proves nothing.
func peerCert(r *http.Request) (sum [32]byte, ok bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return sum, false
	}
	return sha256.Sum256(r.TLS.VerifiedChains[0][0].Raw), true
}

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
// wrong secret, revoked, expired, or bound to a client certificate the
// connection did not present) is the one result authBad. The connection's
// certificate is hashed whenever it has one and compared for every token
// found or not, so a bound token presented without its certificate costs
// what a wrong secret costs.
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
	peer, hasPeer := peerCert(r)
	if e == nil {
		h := sha256.Sum256(secret[:])
		subtle.ConstantTimeCompare(h[:], dummyHash[:])
		subtle.ConstantTimeCompare(peer[:], dummyCertHash[:])
		return nil, authBad
	}
	row := e.row
	// Both compares run whatever the first says (no short circuit).
	secretOK := row.matches(&secret)
	certOK := row.certAccepts(&peer, hasPeer)
	if !secretOK || !certOK || row.revoked || !a.now().Before(row.expires) {
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
