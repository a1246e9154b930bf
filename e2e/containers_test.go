package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver, for wait.ForSQL
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// The images default to the public ones; scripts/images.sh builds local images under these
// names on a machine that cannot pull them.
var (
	vaultImage    = envOr("KEYBROKER_E2E_VAULT_IMAGE", "hashicorp/vault:1.21.0")
	localKMSImage = envOr("KEYBROKER_E2E_LOCALKMS_IMAGE", "nsmithuk/local-kms:3")
	postgresImage = envOr("KEYBROKER_E2E_POSTGRES_IMAGE", "postgres:15")
)

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// startTimeout bounds a container's start, readiness included.
const startTimeout = 3 * time.Minute

// startContainer runs img and terminates it when t ends, after logging the tail of its output
// if t failed.
func startContainer(t *testing.T, img string, opts ...testcontainers.ContainerCustomizer) testcontainers.Container {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	opts = append(opts, testcontainers.WithLabels(map[string]string{ownerLabel: owner()}))
	c, err := testcontainers.Run(ctx, img, opts...)
	if c != nil {
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if t.Failed() {
				logTail(ctx, t, img, c)
			}
			if err := c.Terminate(ctx); err != nil {
				t.Errorf("e2e: terminate %s: %v", img, err)
			}
		})
	}
	if err != nil {
		if _, ierr := docker.ImageInspect(ctx, img); ierr != nil {
			t.Fatalf("e2e: image %s is not on this machine and could not be pulled (run scripts/images.sh): %v", img, err)
		}
		t.Fatalf("e2e: start %s: %v", img, err)
	}
	return c
}

// logTail logs the last lines a container wrote, for a failed test's report.
func logTail(ctx context.Context, t *testing.T, img string, c testcontainers.Container) {
	rc, err := c.Logs(ctx)
	if err != nil {
		t.Logf("e2e: logs of %s: %v", img, err)
		return
	}
	defer rc.Close()
	var lines []string
	sc := bufio.NewScanner(rc)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > 40 {
			lines = lines[1:]
		}
	}
	t.Logf("e2e: last lines of %s:\n%s", img, strings.Join(lines, "\n"))
}

// endpoint is host:port where c publishes port.
func endpoint(t *testing.T, c testcontainers.Container, port string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ep, err := c.PortEndpoint(ctx, port, "")
	if err != nil {
		t.Fatalf("e2e: endpoint of %s: %v", port, err)
	}
	return ep
}

// pause freezes every process of c (SIGSTOP-like, by the cgroup freezer): connections stay
// open and nothing answers. The returned function thaws it; it also runs when t ends, so the
// container can be removed.
func pause(t *testing.T, c testcontainers.Container) (unpause func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := docker.ContainerPause(ctx, c.GetContainerID(), client.ContainerPauseOptions{}); err != nil {
		t.Fatalf("e2e: pause container: %v", err)
	}
	paused := true
	unpause = func() {
		if !paused {
			return
		}
		paused = false
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := docker.ContainerUnpause(ctx, c.GetContainerID(), client.ContainerUnpauseOptions{}); err != nil {
			t.Errorf("e2e: unpause container: %v", err)
		}
	}
	t.Cleanup(unpause)
	return unpause
}

// ---- PostgreSQL ----

// pgServer is a PostgreSQL container.
type pgServer struct {
	c   testcontainers.Container
	URL string // superuser connection URL
}

// startPostgres runs PostgreSQL with the official image's environment variables, tuned for
// tests: data in memory, no fsync (a crash of the container is not a scenario here).
func startPostgres(t *testing.T) *pgServer {
	t.Helper()
	c := startContainer(t, postgresImage,
		testcontainers.WithExposedPorts("5432/tcp"),
		testcontainers.WithEnv(map[string]string{
			"POSTGRES_USER": pgUser, "POSTGRES_PASSWORD": pgPassword, "POSTGRES_DB": pgDatabase,
			"POSTGRES_INITDB_ARGS": "--no-sync",
		}),
		// The data on tmpfs: the engine's fuse-overlayfs makes every fsync slow.
		testcontainers.WithTmpfs(map[string]string{"/var/lib/postgresql/data": "rw"}),
		testcontainers.WithCmd("postgres", "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"),
		waitForPostgres(),
	)
	return &pgServer{c: c, URL: pgURL(hostPort(t, c))}
}

// The PostgreSQL servers' throwaway superuser and database.
const pgUser, pgPassword, pgDatabase = "keybroker", "e2e-password", "keybroker"

// pgURL is the superuser's URL of the database at host:port (several, comma-separated, for a
// multi-host URL), with extra query parameters.
func pgURL(hosts string, query ...string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(pgUser, pgPassword), Host: hosts, Path: pgDatabase,
		RawQuery: strings.Join(append([]string{"sslmode=disable"}, query...), "&")}
	return u.String()
}

// waitForPostgres waits until a TCP connection to c's port 5432 runs a query. A TCP
// connection is accepted only by the final server: the entrypoint runs its initialisation
// server on the Unix socket alone.
func waitForPostgres() testcontainers.ContainerCustomizer {
	return testcontainers.WithWaitStrategy(wait.ForSQL("5432/tcp", "pgx", func(host string, port network.Port) string {
		return pgURL(net.JoinHostPort(host, port.Port()))
	}).WithStartupTimeout(startTimeout).WithPollInterval(100 * time.Millisecond))
}

// hostPort is host:port where c publishes PostgreSQL's port.
func hostPort(t *testing.T, c testcontainers.Container) string {
	t.Helper()
	return endpoint(t, c, "5432/tcp")
}

// pool opens a pool on the server, closed when t ends.
func (s *pgServer) pool(t *testing.T, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(s.URL)
	if err != nil {
		t.Fatalf("e2e: parse postgres URL: %v", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("e2e: connect to postgres: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// ---- Vault ----

// vaultServer is a Vault server with file storage, so that its keys survive a stop and a start
// of its container (a dev-mode server keeps them in memory). It is initialised with one unseal
// key, unsealed, and has the transit engine mounted at "transit".
type vaultServer struct {
	c         testcontainers.Container
	Addr      string // http://host:port, the same across restarts
	Token     string // root token
	unsealKey string
}

const vaultConfig = `storage "file" {
  path = "/vault/file"
}
listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}
disable_mlock = true
api_addr      = "http://127.0.0.1:8200"
`

func startVault(t *testing.T) *vaultServer {
	t.Helper()
	// A fixed host port keeps the address clients were given valid across a restart of the
	// container (Docker allocates a new ephemeral port at each start).
	hostPort := freePort(t)
	c := startContainer(t, vaultImage,
		testcontainers.WithEntrypoint("vault"),
		testcontainers.WithCmd("server", "-config=/vault/config/e2e.hcl"),
		testcontainers.WithFiles(testcontainers.ContainerFile{
			Reader: strings.NewReader(vaultConfig), ContainerFilePath: "/vault/config/e2e.hcl", FileMode: 0o644,
		}),
		testcontainers.WithExposedPorts("8200/tcp"),
		testcontainers.WithHostConfigModifier(func(hc *container.HostConfig) {
			hc.PortBindings = network.PortMap{
				network.MustParsePort("8200/tcp"): {{HostPort: strconv.Itoa(hostPort)}},
			}
		}),
		// Sealed and uninitialised servers answer /v1/sys/health with 501 or 503: any answer
		// means the listener is up.
		testcontainers.WithWaitStrategy(wait.ForHTTP("/v1/sys/health").WithPort("8200/tcp").
			WithStatusCodeMatcher(func(int) bool { return true }).
			WithStartupTimeout(startTimeout).WithPollInterval(100*time.Millisecond)),
	)
	v := &vaultServer{c: c, Addr: "http://" + endpoint(t, c, "8200/tcp")}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := v.client(t, "")
	init, err := cli.Sys().InitWithContext(ctx, &vaultapi.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		t.Fatalf("e2e: vault init: %v", err)
	}
	v.Token, v.unsealKey = init.RootToken, init.Keys[0]
	if err := v.unseal(ctx); err != nil {
		t.Fatal(err)
	}
	cli.SetToken(v.Token)
	if err := cli.Sys().MountWithContext(ctx, "transit", &vaultapi.MountInput{Type: "transit"}); err != nil {
		t.Fatalf("e2e: vault: mount transit: %v", err)
	}
	return v
}

// client returns a Vault API client for the server, with token.
func (v *vaultServer) client(t *testing.T, token string) *vaultapi.Client {
	t.Helper()
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.Addr
	cfg.MaxRetries = 0
	cli, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatalf("e2e: vault client: %v", err)
	}
	cli.SetToken(token)
	return cli
}

// unseal unseals the server and waits until it is the active node, ready for requests.
func (v *vaultServer) unseal(ctx context.Context) error {
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.Addr
	cfg.MaxRetries = 0
	cli, err := vaultapi.NewClient(cfg)
	if err != nil {
		return fmt.Errorf("e2e: vault client: %w", err)
	}
	if _, err := cli.Sys().UnsealWithContext(ctx, v.unsealKey); err != nil {
		return fmt.Errorf("e2e: vault unseal: %w", err)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		h, err := cli.Sys().HealthWithContext(ctx)
		if err == nil && h.Initialized && !h.Sealed && !h.Standby {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("e2e: vault did not become active after unseal: %w (last health error: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

// stop stops the Vault container gracefully; its storage stays.
func (v *vaultServer) stop(ctx context.Context) error {
	timeout := 10 * time.Second
	if err := v.c.Stop(ctx, &timeout); err != nil {
		return fmt.Errorf("e2e: stop vault: %w", err)
	}
	return nil
}

// start starts the stopped Vault container again and unseals it.
func (v *vaultServer) start(ctx context.Context) error {
	if err := v.c.Start(ctx); err != nil {
		return fmt.Errorf("e2e: start vault: %w", err)
	}
	return v.unseal(ctx)
}

// freePort returns a TCP port that nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatalf("e2e: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ---- local-kms ----

// kmsServer is a local-kms container: the AWS KMS API at Endpoint.
type kmsServer struct {
	c        testcontainers.Container
	Endpoint string // http://host:port
	Region   string
}

func startLocalKMS(t *testing.T) *kmsServer {
	t.Helper()
	const region = "us-east-1"
	c := startContainer(t, localKMSImage,
		testcontainers.WithExposedPorts("8080/tcp"),
		testcontainers.WithEnv(map[string]string{"PORT": "8080", "KMS_REGION": region, "KMS_ACCOUNT_ID": "111122223333"}),
		testcontainers.WithWaitStrategy(wait.ForHTTP("/").WithPort("8080/tcp").
			WithStatusCodeMatcher(func(int) bool { return true }).
			WithStartupTimeout(startTimeout).WithPollInterval(100*time.Millisecond)),
	)
	return &kmsServer{c: c, Endpoint: "http://" + endpoint(t, c, "8080/tcp"), Region: region}
}
