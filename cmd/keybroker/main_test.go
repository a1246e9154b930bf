package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/jackc/pgx/v5"
	"github.com/profullstack/keybroker/internal/localkms"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain makes this test binary double as the keybroker binary, so the
// scripts run the real command (testscript puts it on $PATH), and starts a
// throwaway PostgreSQL server unless KEYBROKER_TEST_DATABASE_URL names one.
func TestMain(m *testing.M) {
	testscript.Main(pgMain{m}, map[string]func(){
		"keybroker": func() { os.Exit(run(os.Args[1:])) },
	})
}

type pgMain struct{ m *testing.M }

func (p pgMain) Run() int { return pgtest.Main(p.m) }

// TestScripts runs testdata/script/*.txtar. Each script gets a fresh
// database in KEYBROKER_DATABASE_URL (and through a transaction-mode
// PgBouncer in POOLED_DATABASE_URL) and the command `sql` (below).
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(e *testscript.Env) error {
			db := pgtest.NewDatabase(e.T().(testing.TB))
			e.Setenv("KEYBROKER_DATABASE_URL", db)
			e.Setenv("PGURL", db) // for scripts that unset the former
			// The same database through PgBouncer in transaction mode.
			e.Setenv("POOLED_DATABASE_URL", pgtest.PoolerURL(e.T().(testing.TB), db))
			// The scripts set what they need; nothing leaks in from the
			// developer's environment.
			for _, v := range []string{envKEK, envDecryptOnly, envSchema, envConfig, envLogLevel, envLogFormat, envBudget, envDirectKEK} {
				e.Setenv(v, "")
			}
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"sql":   cmdSQL,
			"exits": cmdExits,
			"kms":   cmdKMS,
		},
	})
}

// cmdSQL runs one SQL statement on $PGURL (the script's database) and prints any
// rows it returns, one per line, columns separated by a space (bytea as
// hex), so scripts can corrupt rows and check what changed.
//
//	sql 'UPDATE ...'
//	sql 'SELECT count(*) FROM ...'
func cmdSQL(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: sql 'statement'")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, ts.Getenv("PGURL"))
	ts.Check(err)
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, args[0])
	var out strings.Builder
	if err == nil {
		for rows.Next() {
			vals, verr := rows.Values()
			if verr != nil {
				err = verr
				break
			}
			cols := make([]string, len(vals))
			for i, v := range vals {
				switch v := v.(type) {
				case []byte:
					cols[i] = hex.EncodeToString(v)
				case nil:
					cols[i] = "NULL"
				default:
					cols[i] = fmt.Sprint(v)
				}
			}
			out.WriteString(strings.Join(cols, " ") + "\n")
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	switch {
	case err != nil && !neg:
		ts.Fatalf("sql: %v", err)
	case err == nil && neg:
		ts.Fatalf("sql: unexpected success")
	}
	fmt.Fprint(ts.Stdout(), out.String())
}

// cmdExits runs a program like exec and fails unless it exits with the
// given status, so scripts check keybroker's documented exit codes.
//
//	exits 2 keybroker bogus
func cmdExits(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exits CODE program [args...]")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	err = ts.Exec(args[1], args[2:]...)
	got := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		got = ee.ExitCode()
	case err != nil:
		ts.Fatalf("%v", err)
	}
	if got != want {
		ts.Fatalf("exit status %d, want %d", got, want)
	}
}

// cmdKMS drives a local-kms server (the AWS KMS API) for a script:
//
//	kms start          start one, for this script only (stopped when it ends)
//	kms create VAR     make a key; $VAR is its awskms provider URL
//	kms disable VAR    disable that key (DisableKey)
//	kms enable VAR     enable it again
//
// start puts dummy AWS credentials in the script's environment (and this
// process's, for the admin client), as localkms.SetTestEnv does.
func cmdKMS(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("kms: no negation")
	}
	if len(args) == 0 {
		ts.Fatalf("usage: kms start | kms create VAR | kms disable VAR | kms enable VAR")
	}
	ctx := context.Background()
	if args[0] == "start" {
		dir := ts.MkAbs("local-kms")
		ts.Check(os.MkdirAll(dir, 0o700))
		localkms.SetTestEnv(dir)
		for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED"} {
			ts.Setenv(k, os.Getenv(k))
		}
		s, err := localkms.Start(dir, "", "")
		ts.Check(err)
		ts.Defer(s.Stop)
		kmsServers.Store(ts, s)
		return
	}
	v, _ := kmsServers.Load(ts)
	s, _ := v.(*localkms.Server)
	if s == nil || len(args) != 2 {
		ts.Fatalf("kms %s: run kms start first; usage: kms %s VAR", args[0], args[0])
	}
	switch args[0] {
	case "create":
		arn, err := s.CreateKey(ctx, "keybroker script "+args[1])
		ts.Check(err)
		ts.Setenv(args[1], s.URL(arn))
		ts.Setenv(args[1]+"_ARN", arn)
	case "disable":
		_, err := s.Admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(ts.Getenv(args[1] + "_ARN"))})
		ts.Check(err)
	case "enable":
		_, err := s.Admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(ts.Getenv(args[1] + "_ARN"))})
		ts.Check(err)
	default:
		ts.Fatalf("kms: unknown subcommand %q", args[0])
	}
}

// kmsServers: each script's local-kms (scripts run in parallel, each from
// one goroutine).
var kmsServers sync.Map // *testscript.TestScript → *localkms.Server
