package vault

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/provider"
)

// TokenEventKind says what happened to the provider's Vault token.
type TokenEventKind int

const (
	// TokenRenewed: the token was renewed; TTL is its new lifetime.
	TokenRenewed TokenEventKind = iota + 1
	// TokenLoggedIn: Config.Auth logged in, at New or after renewal
	// stopped; TTL is the new token's lifetime.
	TokenLoggedIn
	// TokenLoginFailed: a re-login failed (Err says why); it is retried
	// with exponential backoff up to a minute apart.
	TokenLoginFailed
	// TokenRenewalStopped: the token can no longer be renewed, because it
	// nears its max TTL (Err nil) or renewal failed (Err). With Config.Auth
	// a re-login follows; with a static token, operations will fail with
	// ErrAccessDenied once it expires.
	TokenRenewalStopped
)

func (k TokenEventKind) String() string {
	switch k {
	case TokenRenewed:
		return "renewed"
	case TokenLoggedIn:
		return "logged in"
	case TokenLoginFailed:
		return "login failed"
	case TokenRenewalStopped:
		return "renewal stopped"
	}
	return "unknown"
}

// TokenEvent reports what the token-renewal goroutine did. It never
// carries the token.
type TokenEvent struct {
	Kind TokenEventKind
	TTL  time.Duration
	Err  error
}

// tokenManager keeps the client's token alive: an api.LifetimeWatcher
// renews it, and when renewal stops (max TTL reached, token revoked) an
// Auth method logs in again.
type tokenManager struct {
	client  *api.Client
	auth    api.AuthMethod
	inc     int // renewal increment, seconds; 0: the token's own TTL
	timeout time.Duration
	onEvent func(TokenEvent)

	ctx    context.Context // canceled by stop
	cancel context.CancelFunc
	done   chan struct{} // closed when run returns
}

// startToken authenticates the client (login, or the static token checked
// with lookup-self) and starts renewal if the token expires.
func startToken(ctx context.Context, client *api.Client, cfg Config) (*tokenManager, error) {
	tm := &tokenManager{
		client:  client,
		auth:    cfg.Auth,
		inc:     int(cfg.RenewIncrement / time.Second),
		timeout: cfg.Timeout,
		onEvent: cfg.OnTokenEvent,
		done:    make(chan struct{}),
	}
	tm.ctx, tm.cancel = context.WithCancel(context.Background())
	var secret *api.Secret
	if tm.auth != nil {
		s, err := tm.login(ctx)
		if err != nil {
			tm.cancel()
			return nil, err
		}
		secret = s
		tm.event(TokenEvent{Kind: TokenLoggedIn, TTL: seconds(s.Auth.LeaseDuration)})
	} else {
		client.SetToken(cfg.Token)
		s, err := tm.lookupSelf(ctx, cfg.Token)
		if err != nil {
			tm.cancel()
			return nil, err
		}
		secret = s
	}
	if secret.Auth.LeaseDuration <= 0 { // never expires (e.g. a root token)
		close(tm.done)
		return tm, nil
	}
	go tm.run(secret)
	return tm, nil
}

// lookupSelf checks the static token and returns it as the Secret a
// LifetimeWatcher expects.
func (tm *tokenManager) lookupSelf(ctx context.Context, token string) (*api.Secret, error) {
	octx, cancel := context.WithTimeout(ctx, tm.timeout)
	defer cancel()
	s, err := tm.client.Auth().Token().LookupSelfWithContext(octx)
	if err != nil {
		return nil, classify(ctx, "open", timedOut(ctx, octx, tm.timeout, err))
	}
	ttl, err := s.TokenTTL()
	if err != nil {
		return nil, openErr(errors.New("unexpected token lookup-self response: bad ttl"))
	}
	renewable, err := s.TokenIsRenewable()
	if err != nil {
		return nil, openErr(errors.New("unexpected token lookup-self response: bad renewable"))
	}
	return &api.Secret{Auth: &api.SecretAuth{ClientToken: token, Renewable: renewable, LeaseDuration: int(ttl / time.Second)}}, nil
}

// login logs in with a token-less clone of the client, so a stale token is
// not sent and in-flight operations keep the old one until the new one is
// set.
func (tm *tokenManager) login(ctx context.Context) (*api.Secret, error) {
	lc, err := tm.client.Clone()
	if err != nil {
		return nil, &provider.Error{Provider: Scheme, Op: "login", Err: err}
	}
	lc.ClearToken()
	octx, cancel := context.WithTimeout(ctx, tm.timeout)
	defer cancel()
	s, err := lc.Auth().Login(octx, tm.auth)
	if err != nil {
		return nil, classify(ctx, "login", timedOut(ctx, octx, tm.timeout, err))
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return nil, &provider.Error{Provider: Scheme, Op: "login", Kind: provider.ErrAccessDenied, Err: errors.New("login returned no token")}
	}
	tm.client.SetToken(s.Auth.ClientToken)
	return s, nil
}

func (tm *tokenManager) run(secret *api.Secret) {
	defer close(tm.done)
	for {
		err := tm.watch(secret)
		if tm.ctx.Err() != nil {
			return
		}
		tm.event(TokenEvent{Kind: TokenRenewalStopped, Err: err})
		if tm.auth == nil {
			return
		}
		if secret = tm.relogin(); secret == nil {
			return
		}
	}
}

// watch renews secret's token until the watcher gives up or stop is
// called. A renewal request already in flight at stop finishes in the
// watcher's own goroutine, bounded by the HTTP client's timeout.
func (tm *tokenManager) watch(secret *api.Secret) error {
	w, err := tm.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret, Increment: tm.inc})
	if err != nil {
		return err
	}
	go w.Start()
	defer w.Stop()
	for {
		select {
		case <-tm.ctx.Done():
			return nil
		case err := <-w.DoneCh():
			return err
		case r := <-w.RenewCh():
			ttl := time.Duration(0)
			if r.Secret != nil && r.Secret.Auth != nil {
				ttl = seconds(r.Secret.Auth.LeaseDuration)
			}
			tm.event(TokenEvent{Kind: TokenRenewed, TTL: ttl})
		}
	}
}

func (tm *tokenManager) relogin() *api.Secret {
	wait := time.Second
	for {
		s, err := tm.login(tm.ctx)
		if err == nil {
			tm.event(TokenEvent{Kind: TokenLoggedIn, TTL: seconds(s.Auth.LeaseDuration)})
			return s
		}
		if tm.ctx.Err() != nil {
			return nil
		}
		tm.event(TokenEvent{Kind: TokenLoginFailed, Err: err})
		t := time.NewTimer(wait)
		select {
		case <-tm.ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, time.Minute)
	}
}

func (tm *tokenManager) event(e TokenEvent) {
	if tm.onEvent != nil {
		tm.onEvent(e)
	}
}

// stop ends renewal and waits for the run goroutine, so no event follows.
func (tm *tokenManager) stop() {
	tm.cancel()
	<-tm.done
}

func seconds(n int) time.Duration { return time.Duration(n) * time.Second }
