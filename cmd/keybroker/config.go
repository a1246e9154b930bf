package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/profullstack/keybroker/envelope"
)

// Environment variables read by keybroker; flags override them, and they
// override the config file.
const (
	envKEK         = "KEYBROKER_KEK"
	envDecryptOnly = "KEYBROKER_KEK_DECRYPT_ONLY"
	envDatabaseURL = "KEYBROKER_DATABASE_URL"
	envSchema      = "KEYBROKER_SCHEMA"
	envConfig      = "KEYBROKER_CONFIG"
	envLogLevel    = "KEYBROKER_LOG_LEVEL"
	envLogFormat   = "KEYBROKER_LOG_FORMAT"
	envBudget      = "KEYBROKER_BUDGET"
	envDirectKEK   = "KEYBROKER_DIRECT_KEK"
	envTenantKEKs  = "KEYBROKER_TENANT_KEK_SCHEMES"
)

// maxConfigSize bounds the config file read into memory.
const maxConfigSize = 1 << 20

// config is the resolved configuration. The JSON tags are the config
// file's keys.
type config struct {
	KEK         string   `json:"kek"`
	DecryptOnly []string `json:"kek_decrypt_only"`
	DatabaseURL string   `json:"database_url"`
	Schema      string   `json:"schema"`
	LogLevel    string   `json:"log_level"`
	LogFormat   string   `json:"log_format"`
	// Budget is pgstore.Config.Budget: encryptions per data key this
	// process creates or reserves (0: pgstore.DefaultBudget). Set it to
	// what the fleet's services use.
	Budget int64 `json:"budget"`
	// DirectKEK is pgstore.Config.DirectKEK: wrap data keys under the KEK
	// itself, without the key hierarchy. Set it as the fleet does.
	DirectKEK bool `json:"direct_kek"`
	// TenantKEKSchemes is pgstore.Config.TenantKEKSchemes: the provider
	// URL schemes a project's own KEK may name (nil: the default,
	// awskms and gcpkms). Set it as the fleet does.
	TenantKEKSchemes []string `json:"tenant_kek_schemes"`
}

// loadConfigFile reads a JSON config file. Unknown keys are an error, so a
// misspelt key is not silently ignored.
func loadConfigFile(path string) (config, error) {
	var c config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return c, fmt.Errorf("config file %s: %w", path, err)
	}
	if len(data) > maxConfigSize {
		return c, fmt.Errorf("config file %s: larger than %d bytes", path, maxConfigSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		// encoding/json errors name the key or offset, never the value.
		return c, fmt.Errorf("config file %s: %v", path, err)
	}
	if dec.More() {
		return c, fmt.Errorf("config file %s: trailing data after the JSON object", path)
	}
	return c, nil
}

// resolve merges flags > environment > file > default for one setting.
func resolve(fs *pflag.FlagSet, flag, env, file, def string) string {
	if f := fs.Lookup(flag); f != nil && f.Changed {
		return f.Value.String()
	}
	if v, ok := os.LookupEnv(env); ok && v != "" {
		return v
	}
	if file != "" {
		return file
	}
	return def
}

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// resolveConfig builds the configuration from the root command's flags,
// the environment and the config file named by --config or KEYBROKER_CONFIG.
func resolveConfig(fs *pflag.FlagSet) (config, error) {
	var file config
	path := resolve(fs, "config", envConfig, "", "")
	if path != "" {
		var err error
		if file, err = loadConfigFile(path); err != nil {
			return config{}, usageErrorf("%v", err)
		}
	}
	c := config{
		KEK:         resolve(fs, "kek", envKEK, file.KEK, ""),
		DatabaseURL: resolve(fs, "database-url", envDatabaseURL, file.DatabaseURL, ""),
		Schema:      resolve(fs, "schema", envSchema, file.Schema, ""),
		LogLevel:    resolve(fs, "log-level", envLogLevel, file.LogLevel, ""), // "": defaultLogLevel, demo: warn
		LogFormat:   resolve(fs, "log-format", envLogFormat, file.LogFormat, "text"),
	}
	fileBudget := ""
	if file.Budget != 0 {
		fileBudget = strconv.FormatInt(file.Budget, 10)
	}
	if b := resolve(fs, "budget", envBudget, fileBudget, ""); b != "" {
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n < 1 || n > envelope.MaxMessagesLimit {
			return config{}, usageErrorf("budget must be a whole number from 1 to %d", int64(envelope.MaxMessagesLimit))
		}
		c.Budget = n
	}
	fileDirect := ""
	if file.DirectKEK {
		fileDirect = "true"
	}
	if d := resolve(fs, "direct-kek", envDirectKEK, fileDirect, ""); d != "" {
		v, err := strconv.ParseBool(d)
		if err != nil {
			return config{}, usageErrorf("direct-kek must be true or false (1 or 0)")
		}
		c.DirectKEK = v
	}
	if f := fs.Lookup("tenant-kek-schemes"); f != nil && f.Changed {
		c.TenantKEKSchemes = splitList(f.Value.String())
	} else if v := os.Getenv(envTenantKEKs); v != "" {
		c.TenantKEKSchemes = splitList(v)
	} else {
		c.TenantKEKSchemes = file.TenantKEKSchemes
	}
	for _, sc := range c.TenantKEKSchemes {
		if sc == "local" {
			return config{}, usageErrorf("tenant-kek-schemes may not name local: a database row never chooses a file keybroker reads")
		}
	}
	// --kek-decrypt-only is a comma-separated list like the variable; the
	// flag may also be repeated.
	if f := fs.Lookup("kek-decrypt-only"); f != nil && f.Changed {
		list, _ := fs.GetStringSlice("kek-decrypt-only")
		c.DecryptOnly = splitList(strings.Join(list, ","))
	} else if v := os.Getenv(envDecryptOnly); v != "" {
		c.DecryptOnly = splitList(v)
	} else {
		c.DecryptOnly = file.DecryptOnly
	}
	return c, nil
}
