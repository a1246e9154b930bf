package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tclog "github.com/testcontainers/testcontainers-go/log"
)

// docker is the engine the containers run on; nil until TestMain found one.
var docker *testcontainers.DockerClient

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// Every container is terminated explicitly (t.Cleanup), so the reaper container, which
	// would have to be pulled, is not needed.
	if _, ok := os.LookupEnv("TESTCONTAINERS_RYUK_DISABLED"); !ok {
		os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
	}
	// The AWS SDK's default chain finds these dummy credentials (local-kms checks none);
	// nothing of the developer's own AWS configuration is used.
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "AKIDKEYBROKERE2E",
		"AWS_SECRET_ACCESS_KEY":       "keybroker-e2e-secret",
		"AWS_CONFIG_FILE":             os.DevNull,
		"AWS_SHARED_CREDENTIALS_FILE": os.DevNull,
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		os.Setenv(k, v)
	}
	for _, k := range []string{"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"} {
		os.Unsetenv(k)
	}
	// testcontainers logs each container's life; tests log what matters to them.
	tclog.SetDefault(tclog.NewNoopLogger())

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	cli, err := connectDocker(ctx)
	cancel()
	if err != nil {
		msg := strings.Join(strings.Fields(err.Error()), " ") // one line
		if os.Getenv("CI") != "" {
			fmt.Fprintf(os.Stderr, "e2e: FAIL: CI is set, so the suite must run, but %s\n", msg)
			return 1
		}
		fmt.Fprintf(os.Stderr, "e2e: skipped: %s\n", msg)
		return 0
	}
	docker = cli
	defer docker.Close()
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	removeOrphans(ctx)
	cancel()
	return m.Run()
}

// ownerLabel marks each container the suite starts with "<hostname>/<pid>" of the test
// process. A run killed before its cleanups (a -timeout panic, a signal; there is no reaper)
// leaves containers behind: the next run removes those, and only those, whose process is gone.
const ownerLabel = "org.profullstack.keybroker.e2e.owner"

func owner() string {
	host, _ := os.Hostname()
	return host + "/" + strconv.Itoa(os.Getpid())
}

func removeOrphans(ctx context.Context) {
	res, err := docker.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: client.Filters{}.Add("label", ownerLabel)})
	if err != nil {
		return
	}
	host, _ := os.Hostname()
	for _, c := range res.Items {
		h, p, _ := strings.Cut(c.Labels[ownerLabel], "/")
		pid, err := strconv.Atoi(p)
		if err != nil || h != host || processAlive(pid) {
			continue
		}
		if c.State == container.StatePaused {
			docker.ContainerUnpause(ctx, c.ID, client.ContainerUnpauseOptions{})
		}
		docker.ContainerRemove(ctx, c.ID, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true})
	}
}

// processAlive reports whether pid is a live process: not gone, and not a zombie whose
// parent has yet to reap it.
func processAlive(pid int) bool {
	if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// pid (comm) state ...; comm may hold spaces and parentheses.
		if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			return false
		}
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// connectDocker finds the Docker engine and makes the ports it publishes reachable.
func connectDocker(ctx context.Context) (*testcontainers.DockerClient, error) {
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return nil, fmt.Errorf("no Docker engine: %w", err)
	}
	if _, err := cli.Ping(ctx, client.PingOptions{}); err != nil {
		cli.Close()
		return nil, fmt.Errorf("no Docker engine: %w", err)
	}
	if err := setHostOverride(ctx, cli); err != nil {
		cli.Close()
		return nil, err
	}
	return cli, nil
}

// setHostOverride handles a test process that runs on the engine's own host but sees a
// /.dockerenv file (a VM image made from a container, as on this project's CI machine):
// testcontainers then believes it runs inside a container and reaches published ports
// through the default gateway, where nothing listens. The engine's bridge device being
// visible here proves the process shares the engine's network namespace, where published
// ports are on localhost. TESTCONTAINERS_HOST_OVERRIDE, when set, wins.
func setHostOverride(ctx context.Context, cli *testcontainers.DockerClient) error {
	if _, ok := os.LookupEnv("TESTCONTAINERS_HOST_OVERRIDE"); ok {
		return nil
	}
	if u, err := url.Parse(cli.DaemonHost()); err != nil || u.Scheme != "unix" {
		return nil
	}
	nw, err := cli.NetworkInspect(ctx, "bridge", client.NetworkInspectOptions{})
	if err != nil {
		return nil // no default bridge: testcontainers' own inference applies
	}
	dev := nw.Network.Options["com.docker.network.bridge.name"]
	if dev == "" {
		dev = "docker0"
	}
	if _, err := net.InterfaceByName(dev); err == nil {
		os.Setenv("TESTCONTAINERS_HOST_OVERRIDE", "localhost")
	}
	return nil
}
