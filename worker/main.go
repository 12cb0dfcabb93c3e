// Command worker runs cbtflow's Temporal worker: it registers the backup
// workflows and their activities with the real dependencies — vCenter
// sessions, the PostgreSQL catalog, the repository of restore points, NBD
// sources — and serves Prometheus metrics. Configuration comes from the
// environment, with flags of the same meaning (see internal/config).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

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

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(log, os.Args[1:]); err != nil {
		log.Error("worker stopped", "error", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, args []string) error {
	var cfg config.Config
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	cfg.Register(fs)
	parallel := fs.Int("max-transfers", 4, "disk transfers (TransferDisk) this worker process copies at once; more wait, heartbeating, for a free slot; other activities are not limited by it")
	defaultProfile := fs.String("profile", config.Env("CBTFLOW_PROFILE", ""),
		"vCenter `profile` of a backup that names none (CBTFLOW_PROFILE); empty: the only profile of the profiles file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *parallel < 1 {
		return fmt.Errorf("--max-transfers %d: at least 1", *parallel)
	}
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
	sessions := vsphere.NewSessionsWithOptions(profiles, log, vsphere.SessionOptions{DefaultProfile: *defaultProfile})
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
	case err != nil && *defaultProfile != "":
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
	w := newWorker(c, deps{sessions: sessions, repo: repo, catalog: cat, namespace: cfg.Namespace, activityContext: actx, metrics: bm}, *parallel)

	log.Info("worker starting", "temporal", cfg.TemporalAddress, "namespace", cfg.Namespace,
		"task_queue", workflows.TaskQueue, "repository", repoRoot, "profiles", len(profiles), "default_profile", def)
	if err := w.Start(); err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("worker stopping")
	w.Stop()
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	return ctx.Err()
}
