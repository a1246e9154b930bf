package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"
)

// TestContainersPostgres checks the PostgreSQL container the scenarios rely on: the official
// image's variables are honoured (user, password, database), the server is 15, a paused server
// makes a query time out and answers again once thawed.
func TestContainersPostgres(t *testing.T) {
	pg := startPostgres(t)
	pool := pg.pool(t, 4)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	var user, db string
	var version int
	if err := pool.QueryRow(ctx, `SELECT current_user, current_database(), current_setting('server_version_num')::int`).Scan(&user, &db, &version); err != nil {
		t.Fatalf("query: %v", err)
	}
	if user != "keybroker" || db != "keybroker" || version/10000 != 15 {
		t.Fatalf("connected as %q to %q on server %d, want keybroker, keybroker, 15xxxx", user, db, version)
	}

	unpause := pause(t, pg.c)
	qctx, qcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err := pool.Exec(qctx, `SELECT 1`)
	qcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("query on a paused server: err = %v, want a deadline error", err)
	}
	unpause()
	var one int
	if err := pool.QueryRow(ctx, `SELECT 1`).Scan(&one); err != nil || one != 1 {
		t.Fatalf("query after unpause: %d, %v", one, err)
	}
}

// TestContainersVault checks that a transit key survives a stop and a start of the Vault
// container: a ciphertext made before decrypts after.
func TestContainersVault(t *testing.T) {
	v := startVault(t)
	cli := v.client(t, v.Token)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	if _, err := cli.Logical().WriteWithContext(ctx, "transit/keys/smoke", map[string]any{"type": "aes256-gcm96"}); err != nil {
		t.Fatalf("create transit key: %v", err)
	}
	plaintext := base64.StdEncoding.EncodeToString([]byte("survives a restart"))
	sec, err := cli.Logical().WriteWithContext(ctx, "transit/encrypt/smoke", map[string]any{"plaintext": plaintext})
	if err != nil {
		t.Fatalf("encrypt: %v", err)
	}
	ciphertext := sec.Data["ciphertext"]

	if err := v.stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Logical().ReadWithContext(ctx, "transit/keys/smoke"); err == nil {
		t.Fatal("read from a stopped Vault succeeded")
	}
	if err := v.start(ctx); err != nil {
		t.Fatal(err)
	}
	sec, err = cli.Logical().WriteWithContext(ctx, "transit/decrypt/smoke", map[string]any{"ciphertext": ciphertext})
	if err != nil {
		t.Fatalf("decrypt after restart: %v", err)
	}
	if got := sec.Data["plaintext"]; got != plaintext {
		t.Fatalf("decrypt after restart = %v, want %v", got, plaintext)
	}
}

// TestContainersLocalKMS checks that local-kms answers the AWS KMS API: a key it creates
// encrypts and decrypts.
func TestContainersLocalKMS(t *testing.T) {
	kms := startLocalKMS(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	var created struct{ KeyMetadata struct{ Arn string } }
	kmsCall(ctx, t, kms, "CreateKey", map[string]any{}, &created)
	var enc struct{ CiphertextBlob []byte }
	kmsCall(ctx, t, kms, "Encrypt", map[string]any{"KeyId": created.KeyMetadata.Arn, "Plaintext": []byte("local-kms")}, &enc)
	var dec struct{ Plaintext []byte }
	kmsCall(ctx, t, kms, "Decrypt", map[string]any{"CiphertextBlob": enc.CiphertextBlob}, &dec)
	if string(dec.Plaintext) != "local-kms" {
		t.Fatalf("decrypt = %q, want %q", dec.Plaintext, "local-kms")
	}
}

// kmsCall makes one AWS KMS JSON API call; local-kms does not check signatures.
func kmsCall(ctx context.Context, t *testing.T, kms *kmsServer, op string, in, out any) {
	t.Helper()
	body, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, kms.Endpoint, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "TrentService."+op)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("kms %s: %v", op, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s: %s", resp.Status, b)
	}
	if err == nil {
		err = json.Unmarshal(b, out)
	}
	if err != nil {
		t.Fatalf("kms %s: %v", op, err)
	}
}
