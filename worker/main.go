// Command worker runs cbtflow's Temporal worker: it registers the backup
// workflows and their activities with the real dependencies — vCenter
// sessions, the PostgreSQL catalog, the repository of restore points, NBD
// sources — and serves Prometheus metrics. Configuration comes from the
// environment, with flags of the same meaning (see internal/config).
//
// Run `worker --help` for the flags and `worker --version` for the
// build. Logs go to stderr; stdout carries only help and the version.
// Exit codes: 0 (stopped by SIGINT or SIGTERM), 1 (failed), 2 (bad
// command line).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"
	sdktally "go.temporal.io/sdk/contrib/tally"
	tlog "go.temporal.io/sdk/log"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/metrics"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/workflows"
)

// version is the worker's release version, set at build time with
// -ldflags "-X main.version=v1.2.3"; the commit comes from the build info.
var version = "dev"

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	os.Exit(execute(log, os.Stdout, os.Stderr, os.Args[1:]))
}

// execute runs the worker's command line and returns its exit code: 0
// when it ran (or printed help or its version) and stopped on a signal,
// 2 for a bad command line (printed on stderr, with where to find help),
// 1 when the worker failed (logged).
func execute(log *slog.Logger, stdout, stderr io.Writer, args []string) int {
	cmd := newRootCmd(log)
	cmd.SetArgs(goStyleFlags(cmd, args))
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	err := cmd.Execute()
	var usage usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &usage):
		fmt.Fprintln(stderr, "worker:", usage.err)
		fmt.Fprintln(stderr, "Run 'worker --help' for usage.")
		return 2
	}
	log.Error("worker stopped", "error", err)
	return 1
}

// run runs the worker with the command line args, as main does, and
// returns its error.
func run(log *slog.Logger, args []string) error {
	cmd := newRootCmd(log)
	cmd.SetArgs(goStyleFlags(cmd, args))
	return cmd.Execute()
}

// goStyleFlags returns args with the worker's long flags written with one
// dash, as the flag package accepted them before the worker used cobra
// (-metrics-addr X, -help), given their two: a unit file of an older
// release keeps working. Never nil (nil would make cobra read os.Args).
func goStyleFlags(cmd *cobra.Command, args []string) []string {
	cmd.InitDefaultHelpFlag()
	cmd.InitDefaultVersionFlag()
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' {
			name, _, _ := strings.Cut(a[1:], "=")
			if len(name) > 1 && cmd.Flags().Lookup(name) != nil {
				a = "-" + a
			}
		}
		out = append(out, a)
	}
	return out
}

// usageError is a bad command line: exit 2.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

// options are the worker's settings from the command line and the
// environment.
type options struct {
	cfg            config.Config
	maxTransfers   int
	defaultProfile string
}

// newRootCmd is the worker's command: no subcommands, the settings of
// internal/config (environment variables with flags of the same meaning,
// registered on a Go flag set and bridged to cobra's) and the worker's own
// flags.
func newRootCmd(log *slog.Logger) *cobra.Command {
	var o options
	cmd := &cobra.Command{
		Use:   "worker [flags]",
		Short: "run cbtflow's Temporal worker: backups of vSphere VMs into QCOW2",
		Long: fmt.Sprintf(`worker runs cbtflow's Temporal worker: it polls the task queue %q for
the backup, prune and sweep workflows and their activities, with vCenter
sessions, the PostgreSQL catalog and the repository of restore points,
and serves Prometheus metrics on /metrics (--metrics-addr).

Every setting is an environment variable or the flag of the same meaning
(the flag wins); the defaults point at the make dev stack. A database
password belongs in a pgpass file (passfile= in the URL, or PGPASSFILE),
never in the URL; vCenter passwords are files the profiles name.

Logs go to stderr. It runs until SIGINT or SIGTERM (exit 0). Exit codes:
1 failure, 2 bad usage.`, workflows.TaskQueue),
		Version:       config.VersionString(version),
		SilenceErrors: true,
		SilenceUsage:  true,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unexpected argument %q: the worker takes flags only", args[0])}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.maxTransfers < 1 {
				return usageError{fmt.Errorf("--max-transfers %d: at least 1", o.maxTransfers)}
			}
			return serve(log, o)
		},
	}
	cmd.SetVersionTemplate("{{.Name}} {{.Version}}\n")
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })

	gfs := flag.NewFlagSet("worker", flag.ContinueOnError)
	o.cfg.Register(gfs)
	gfs.IntVar(&o.maxTransfers, "max-transfers", 4, "disk transfers (TransferDisk) this worker process copies at once; more wait, heartbeating, for a free slot; other activities are not limited by it")
	gfs.StringVar(&o.defaultProfile, "profile", config.Env("CBTFLOW_PROFILE", ""),
		"vCenter `profile` of a backup that names none (CBTFLOW_PROFILE); empty: the only profile of the profiles file")
	cmd.Flags().AddGoFlagSet(gfs)
	cmd.CompletionOptions.DisableDefaultCmd = true
	// The help shows each flag's default, taken from the environment: a
	// password in CBTFLOW_DATABASE_URL must not show.
	if f := cmd.Flags().Lookup("database-url"); f != nil {
		f.DefValue = config.RedactDatabaseURL(f.DefValue)
	}
	return cmd
}

// databaseAttrs describes the catalog's database for the log: host, port,
// database and user as the driver reads them (never the password).
func databaseAttrs(dbURL string) slog.Attr {
	pc, err := pgconn.ParseConfig(dbURL)
	if err != nil {
		// The parse error may quote the URL: not logged here (the
		// catalog reports it, redacted).
		return slog.String("database", "(malformed connection string)")
	}
	return slog.Group("database", "host", pc.Host, "port", pc.Port, "name", pc.Database, "user", pc.User)
}

// profilesAttr lists the vCenter profiles for the log: each name and its
// vCenter's host (the URL's host only: never a user or a password).
func profilesAttr(profiles map[string]vsphere.Profile) slog.Attr {
	names := make([]string, 0, len(profiles))
	for n := range profiles {
		names = append(names, n)
	}
	slices.Sort(names)
	var b strings.Builder
	for i, n := range names {
		host := "?"
		if u, err := url.Parse(profiles[n].URL); err == nil && u.Host != "" {
			host = u.Host
		}
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s=%s", n, host)
	}
	return slog.String("profiles", b.String())
}

// serve runs the worker until SIGINT or SIGTERM.
func serve(log *slog.Logger, o options) error {
	cfg := o.cfg
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	repoRoot, err := cfg.AbsRepository()
	if err != nil {
		return err
	}
	repo, err := repository.Open(repoRoot)
	if err != nil {
		return err
	}
	profiles, err := vsphere.LoadProfiles(cfg.VCenters)
	if err != nil {
		return err
	}
	metricsAddr := cfg.MetricsAddr
	if metricsAddr == "" {
		metricsAddr = "off"
	}
	log.Info("worker starting", "version", config.VersionString(version),
		slog.Group("temporal", "address", cfg.TemporalAddress, "namespace", cfg.Namespace, "task_queue", workflows.TaskQueue),
		databaseAttrs(cfg.DatabaseURL), "repository", repoRoot, "vcenters", cfg.VCenters, profilesAttr(profiles),
		"metrics", metricsAddr, "max_transfers", o.maxTransfers)
	// vCenter calls are counted once the metrics are served (below).
	var vcenterCalls atomic.Pointer[metrics.Backup]
	sessions := vsphere.NewSessionsWithOptions(profiles, log, vsphere.SessionOptions{DefaultProfile: o.defaultProfile,
		OnCall: func(profile, method string) {
			if b := vcenterCalls.Load(); b != nil {
				b.VCenterCall(profile, method)
			}
		}})
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = sessions.Close(cctx)
	}()
	// A default that names no configured profile is a mistake to report
	// now. Several profiles and no default is a valid set-up: then every
	// backup names its profile, and one that does not fails at once.
	def, err := sessions.DefaultProfile()
	switch {
	case err != nil && o.defaultProfile != "":
		return err
	case err != nil:
		log.Warn("no default vCenter profile: a backup must name its profile", "reason", err)
	}

	octx, cancel := context.WithTimeout(ctx, time.Minute)
	cat, err := catalog.Open(octx, cfg.DatabaseURL)
	cancel()
	if err != nil {
		return err
	}
	defer cat.Close()

	opts := client.Options{
		HostPort:  cfg.TemporalAddress,
		Namespace: cfg.Namespace,
		Logger:    tlog.NewStructuredLogger(log),
	}
	var ms *metrics.Server
	var bm activities.Metrics
	if cfg.MetricsAddr != "" {
		if ms, err = startMetrics(cfg.MetricsAddr, cat, repoRoot, log); err != nil {
			return err
		}
		defer ms.Close(context.Background())
		opts.MetricsHandler = sdktally.NewMetricsHandler(ms.Scope)
		bm = ms.Backup
		vcenterCalls.Store(ms.Backup)
		log.Info("serving metrics", "addr", "http://"+ms.Addr()+"/metrics")
	}
	c, err := client.DialContext(ctx, opts)
	if err != nil {
		return fmt.Errorf("connect to Temporal at %s: %w", cfg.TemporalAddress, err)
	}
	defer c.Close()

	// Fault tests hold activities at step boundaries; only a worker built
	// with -tags cbtflow_faultpoints has fault points, and a release build
	// neither reads their variable nor keeps this branch.
	actx, faultDir := faultpoint.FromEnv(context.Background())
	if faultDir != "" {
		log.Warn("fault points enabled", "dir", faultDir)
	}
	w := newWorker(c, deps{sessions: sessions, repo: repo, catalog: cat, namespace: cfg.Namespace, activityContext: actx, metrics: bm, log: log}, o.maxTransfers)

	if err := w.Start(); err != nil {
		return err
	}
	log.Info("worker started", "temporal", cfg.TemporalAddress, "namespace", cfg.Namespace,
		"task_queue", workflows.TaskQueue, "default_profile", def)
	<-ctx.Done()
	log.Info("worker stopping")
	w.Stop()
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	return ctx.Err()
}
