// Package config holds the settings shared by cbtflow's worker and CLI:
// each is an environment variable with a flag of the same meaning, and
// every default points at the local dev stack (make dev), so a newcomer
// needs no configuration.
//
// It does not read secrets: vCenter passwords live in files named by the
// vCenter profiles (CBTFLOW_VCENTERS).
package config

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

// Config is what the worker and the CLI need to find the stack.
type Config struct {
	TemporalAddress string // TEMPORAL_ADDRESS
	Namespace       string // TEMPORAL_NAMESPACE
	DatabaseURL     string // CBTFLOW_DATABASE_URL
	Repository      string // CBTFLOW_REPOSITORY
	VCenters        string // CBTFLOW_VCENTERS
	MetricsAddr     string // CBTFLOW_METRICS_ADDR
}

// Defaults of the local dev stack.
const (
	DefaultTemporalAddress = "127.0.0.1:7233"
	DefaultNamespace       = "default"
	DefaultDatabaseURL     = "postgres:///cbtflow?host=/var/run/postgresql"
	DefaultMetricsAddr     = "127.0.0.1:9464"
	// StateDir is the dev stack's folder, relative to the checkout.
	StateDir = ".cbtflow"
)

// Env returns the value of an environment variable, or def.
func Env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

// Register defines the flags on fs with defaults from the environment.
func (c *Config) Register(fs *flag.FlagSet) {
	fs.StringVar(&c.TemporalAddress, "temporal-address", Env("TEMPORAL_ADDRESS", DefaultTemporalAddress), "Temporal frontend host:port (TEMPORAL_ADDRESS)")
	fs.StringVar(&c.Namespace, "namespace", Env("TEMPORAL_NAMESPACE", DefaultNamespace), "Temporal namespace (TEMPORAL_NAMESPACE)")
	fs.StringVar(&c.DatabaseURL, "database-url", Env("CBTFLOW_DATABASE_URL", DefaultDatabaseURL), "catalog PostgreSQL URL (CBTFLOW_DATABASE_URL)")
	fs.StringVar(&c.Repository, "repository", Env("CBTFLOW_REPOSITORY", filepath.Join(StateDir, "repository")), "folder of restore points (CBTFLOW_REPOSITORY)")
	fs.StringVar(&c.VCenters, "vcenters", Env("CBTFLOW_VCENTERS", filepath.Join(StateDir, "vcenters.json")), "file of vCenter profiles (CBTFLOW_VCENTERS)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", Env("CBTFLOW_METRICS_ADDR", DefaultMetricsAddr), "address of the Prometheus /metrics endpoint, empty to disable (CBTFLOW_METRICS_ADDR)")
}

// AbsRepository returns the repository folder as an absolute path.
func (c *Config) AbsRepository() (string, error) {
	p, err := filepath.Abs(c.Repository)
	if err != nil {
		return "", fmt.Errorf("repository %q: %w", c.Repository, err)
	}
	return p, nil
}
