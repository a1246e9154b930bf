package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/term"
)

const helpText = `keybroker manages MeshHook's envelope-encrypted secrets in PostgreSQL.

Each secret is sealed with AES-256-GCM under a per-project data key (DEK);
DEKs are wrapped by a key-encryption key (KEK) held by a key service.

Configuration (highest precedence first):
  1. flags               --kek, --kek-decrypt-only, --database-url, --schema,
                         --budget, --direct-kek, --log-level, --log-format
  2. environment         KEYBROKER_KEK                primary KEK provider URL
                         KEYBROKER_KEK_DECRYPT_ONLY   comma-separated decrypt-only URLs
                         KEYBROKER_DATABASE_URL       PostgreSQL URL
                         KEYBROKER_SCHEMA             schema holding keybroker's tables
                         KEYBROKER_BUDGET             encryptions per data key (as the services')
                         KEYBROKER_DIRECT_KEK         1: no key hierarchy (as the services')
                         KEYBROKER_TENANT_KEK_SCHEMES schemes a project's own KEK may name
                         KEYBROKER_LOG_LEVEL, KEYBROKER_LOG_FORMAT
                         KEYBROKER_CONFIG             config file (like --config)
  3. config file         --config FILE, a JSON object with the keys
                         kek, kek_decrypt_only (array), database_url, schema,
                         budget (number), direct_kek (boolean),
                         tenant_kek_schemes (array), log_level,
                         log_format; unknown keys
                         are an error
  4. defaults            log level warn when stderr is a terminal (so per-key
                         and per-batch info lines do not bury the progress
                         bar), info otherwise; log format text

Provider URLs:
  local:///path/keyring.json   or local://env/VARNAME   (keybroker keygen makes one)
  awskms://alias/<name>?region=eu-west-1   or awskms:///arn:aws:kms:...
  gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K
  vault://<transit mount>/keys/<name>?addr=https://vault:8200   (token: VAULT_TOKEN)
Each backend's package documentation lists its query parameters. Errors and
logs never echo a provider URL.

Output: results go to stdout (--json for machine-readable output); logs go to
stderr (log/slog, --log-level debug|info|warn|error, --log-format text|json);
an error is one line on stderr, "keybroker: <problem>". Long operations show a
progress bar when stdout is a terminal and progress lines on stderr otherwise.
Every write accepts --dry-run: it reports what would change and writes nothing.
Run keybroker as a database role that row-level security does not restrict
(the tables' owner, as migrate makes them): rewrap, import-plaintext, status
and verify work across all projects.

Exit codes:
  0    success
  1    error (nothing was partially written; rerunning continues)
  2    usage: bad flag, argument or configuration (any config source; a
       provider URL or keyring its backend refuses to open)
  3    status: data keys are still wrapped under a retired or missing key
       version
  4    verify: at least one secret failed to decrypt
  5    work remains (rows locked by another process, corrupt keys left as
       they are, old data keys still in use, a retire half done): the
       message says what committed; rerun it (or the command it names),
       or use --wait / --lock-wait
  130  interrupted (Ctrl-C or SIGTERM); rerun to continue

keybroker version (or --version) prints the build: module version, VCS
revision, time and modified flag (when the build recorded them), Go version.`

// app is the state shared by all commands.
type app struct {
	stdout, stderr       io.Writer
	stdoutTTY, stderrTTY bool

	cfg     config
	log     *slog.Logger
	logOut  *logWriter // the logger's writer: stderr
	json    bool
	started bool // set once flags and arguments were accepted
}

func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal the command winds down (rolls back, stops the
	// demo's server); a second one gets the default behaviour: exit now.
	go func() { <-ctx.Done(); stop() }()
	a := &app{
		stdout:    os.Stdout,
		stderr:    os.Stderr,
		stdoutTTY: term.IsTerminal(int(os.Stdout.Fd())),
		stderrTTY: term.IsTerminal(int(os.Stderr.Fd())),
		logOut:    &logWriter{w: os.Stderr},
	}
	root := newRootCmd(a)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	if !a.started {
		// cobra failed before any command ran: unknown command or flag,
		// wrong number of arguments.
		err = &codeError{code: exitUsage, err: err}
	}
	if ctx.Err() != nil {
		err = &interruptedError{hint: resumeHint(err)}
	}
	fmt.Fprintf(a.stderr, "keybroker: %s\n", oneLine(err))
	return exitCode(err)
}

func newRootCmd(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:           "keybroker",
		Short:         "Envelope encryption for MeshHook's secrets in PostgreSQL",
		Long:          helpText,
		Version:       buildVersion().String(),
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			a.started = true
			return a.setup(cmd)
		},
	}
	root.SetVersionTemplate("{{.Version}}")
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &codeError{code: exitUsage, err: err}
	})
	pf := root.PersistentFlags()
	pf.String("config", "", "JSON config file (env KEYBROKER_CONFIG)")
	pf.String("kek", "", "primary KEK provider URL (env KEYBROKER_KEK)")
	pf.StringSlice("kek-decrypt-only", nil, "decrypt-only KEK provider URLs, comma-separated (env KEYBROKER_KEK_DECRYPT_ONLY)")
	pf.String("database-url", "", "PostgreSQL URL (env KEYBROKER_DATABASE_URL)")
	pf.String("schema", "", "schema holding keybroker's tables (env KEYBROKER_SCHEMA)")
	pf.String("budget", "", "encryptions per data key, as the fleet's pgstore.Config.Budget (env KEYBROKER_BUDGET; default 16777216)")
	pf.String("direct-kek", "", "true: wrap data keys under the KEK itself, no intermediate keys, as the fleet's pgstore.Config.DirectKEK (env KEYBROKER_DIRECT_KEK; default false)")
	pf.String("tenant-kek-schemes", "", "provider URL schemes a project's own KEK may name, comma-separated, as the fleet's pgstore.Config.TenantKEKSchemes (env KEYBROKER_TENANT_KEK_SCHEMES; default awskms,gcpkms; never local)")
	pf.String("log-level", "", "debug, info, warn or error (default warn on a terminal, info otherwise)")
	pf.String("log-format", "", "text or json (default text)")
	pf.BoolVar(&a.json, "json", false, "machine-readable JSON output on stdout")

	root.AddCommand(
		newDemoCmd(a),
		newMigrateCmd(a),
		newPutCmd(a), newGetCmd(a), newDeleteCmd(a), newListCmd(a),
		newProjectCmd(a),
		newRotateCmd(a), newRewrapCmd(a), newReencryptCmd(a), newRetireCmd(a),
		newImportCmd(a),
		newColumnCmd(a),
		newStatusCmd(a), newVerifyCmd(a),
		newProjectCmd(a), newRecoveryCmd(a), newRecoverCmd(a),
		newKeygenCmd(a),
		newServeCmd(a), newTokenCmd(a),
		newVersionCmd(a),
		newManCmd(a),
	)
	return root
}

// setup resolves the configuration and builds the logger.
func (a *app) setup(cmd *cobra.Command) error {
	cfg, err := resolveConfig(cmd.Flags())
	if err != nil {
		return err
	}
	a.cfg = cfg
	return a.setLogger(a.defaultLogLevel())
}

// defaultLogLevel is warn when the logs go to a terminal, where a person
// watches the progress bar and reads results on stdout, and info otherwise
// (log files, journald, CI), where the info lines are the record.
func (a *app) defaultLogLevel() string {
	if a.stderrTTY {
		return "warn"
	}
	return "info"
}

// setLogger builds the stderr logger at the configured level, or at def
// when none is configured.
func (a *app) setLogger(def string) error {
	name := a.cfg.LogLevel
	if name == "" {
		name = def
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(name)); err != nil {
		return usageErrorf("log level %q: want debug, info, warn or error", name)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch strings.ToLower(a.cfg.LogFormat) {
	case "text":
		a.log = slog.New(slog.NewTextHandler(a.logOut, opts))
	case "json":
		a.log = slog.New(slog.NewJSONHandler(a.logOut, opts))
	default:
		return usageErrorf("log format %q: want text or json", a.cfg.LogFormat)
	}
	return nil
}

// args wraps a cobra positional-argument check so that a wrong count is a
// usage error.
func args(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if err := check(cmd, a); err != nil {
			return &codeError{code: exitUsage, err: fmt.Errorf("%s: %v", cmd.Name(), err)}
		}
		return nil
	}
}
