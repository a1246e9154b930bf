// Package localkms starts local-kms (the AWS KMS API, patched by
// scripts/deps.sh with key material ids) for tests: the one launcher the
// awskms provider's tests and pgstore's per-project KEK tests share.
//
// # Use
//
// Call SetTestEnv first (from TestMain), so the AWS SDK's default chain
// finds dummy credentials and nothing of the developer's own AWS
// configuration; then Start. The server listens on 127.0.0.1 on a port it
// picks itself; Stop kills it (SIGKILL) and waits for it.
package localkms

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/profullstack/keybroker/internal/testbin"
)

// Region is local-kms's region; its keys' ARNs name it.
const Region = "eu-west-2"

// Server is a running local-kms.
type Server struct {
	Endpoint string      // http://127.0.0.1:<port>
	Admin    *kms.Client // a plain SDK client, for setting keys up
	cmd      *exec.Cmd
}

// SetTestEnv points the AWS SDK's default credential chain at dummy
// credentials under dir and clears the variables that would reach a real
// account or endpoint.
func SetTestEnv(dir string) {
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "AKIDKEYBROKERTEST",
		"AWS_SECRET_ACCESS_KEY":       "keybroker-test-secret",
		"AWS_CONFIG_FILE":             filepath.Join(dir, "aws-config"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "aws-credentials"),
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		os.Setenv(k, v)
	}
	for _, k := range []string{"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"} {
		os.Unsetenv(k)
	}
}

// Start starts local-kms with its data under dir and, when seed is not
// empty, that seed file's YAML (keys and aliases made at start), and
// waits until it answers a real request (DescribeKey of probeKey when not
// empty, else ListKeys). It fails when the binary lacks the key material
// patch (probeKey must then be a seeded key).
func Start(dir, seed, probeKey string) (*Server, error) {
	bin, err := testbin.Find("local-kms")
	if err != nil {
		return nil, err
	}
	env := append(os.Environ(), "PORT=0", "KMS_REGION="+Region, "KMS_DATA_PATH="+filepath.Join(dir, "data"))
	if seed != "" {
		seedPath := filepath.Join(dir, "seed.yaml")
		if err := os.WriteFile(seedPath, []byte(seed), 0o600); err != nil {
			return nil, err
		}
		env = append(env, "KMS_SEED_PATH="+seedPath)
	}
	cmd := exec.Command(bin)
	cmd.Env = env
	logs, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("localkms: starting %s: %w", bin, err)
	}
	s := &Server{cmd: cmd}

	// local-kms logs the port it bound; the log ends if it exits.
	portRE := regexp.MustCompile(`Local KMS started on [^ ]*:(\d+)`)
	var port, tail string
	sc := bufio.NewScanner(logs)
	for sc.Scan() {
		tail = sc.Text()
		if m := portRE.FindStringSubmatch(tail); m != nil {
			port = m[1]
			break
		}
	}
	if port == "" {
		s.Stop()
		return nil, fmt.Errorf("localkms: local-kms exited before listening; last log line: %q", tail)
	}
	go io.Copy(io.Discard, logs) // keep draining so it never blocks on a full pipe

	s.Endpoint = "http://" + net.JoinHostPort("127.0.0.1", port)
	cfg, err := config.LoadDefaultConfig(context.Background(), config.WithRegion(Region))
	if err != nil {
		s.Stop()
		return nil, err
	}
	s.Admin = kms.NewFromConfig(cfg, func(o *kms.Options) { o.BaseEndpoint = aws.String(s.Endpoint) })

	// It listens before it serves: poll with real requests, a bounded number
	// of times.
	for i := 0; ; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if probeKey != "" {
			_, err = s.Admin.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(probeKey)})
		} else {
			_, err = s.Admin.ListKeys(ctx, &kms.ListKeysInput{})
		}
		cancel()
		if err == nil {
			break
		}
		if i == 50 {
			s.Stop()
			return nil, fmt.Errorf("localkms: local-kms at %s does not answer: %w", s.Endpoint, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return s, nil
}

// URL is the awskms provider URL of key (an ARN or alias) on s.
func (s *Server) URL(key string) string {
	return "awskms:///" + key + "?region=" + Region + "&endpoint=" + s.Endpoint
}

// CreateKey makes a fresh symmetric key and returns its ARN.
func (s *Server) CreateKey(ctx context.Context, description string) (string, error) {
	out, err := s.Admin.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String(description)})
	if err != nil {
		return "", fmt.Errorf("localkms: CreateKey: %w", err)
	}
	return aws.ToString(out.KeyMetadata.Arn), nil
}

// Stop kills the server and waits for it.
func (s *Server) Stop() {
	s.cmd.Process.Kill()
	s.cmd.Wait()
}
