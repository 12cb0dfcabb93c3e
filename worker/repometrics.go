package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/metrics"
	"github.com/cbtflow/cbtflow/internal/repository"
)

// startMetrics serves the worker's /metrics on addr: the Temporal SDK's
// metrics (the returned server's Scope) and, on the same endpoint, the
// repository's, read from the catalog and the repository folder.
func startMetrics(addr string, cat *catalog.Catalog, root string, log *slog.Logger) (*metrics.Server, error) {
	ms, err := metrics.Start(addr)
	if err != nil {
		return nil, err
	}
	if err := ms.Register(newRepoCollector(cat, root, log)); err != nil {
		_ = ms.Close(context.Background())
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return ms, nil
}

// The repository's metrics. They are read when Prometheus scrapes, at most
// once per repoMetricsMaxAge (more scrapes get the same reading), so they
// hold what the catalog holds whichever worker wrote it, and survive
// restarts: the prunes' counters are sums over the catalog's prunes table.
var (
	descPruneBytesFreed = prom.NewDesc("cbtflow_prune_bytes_freed_total",
		"Bytes that prunes freed in the repository, all told (the catalog's record of prunes).", nil, nil)
	descPrunes = prom.NewDesc("cbtflow_prunes_total",
		"Prunes recorded in the catalog (one per VM and prune run).", nil, nil)
	descRestorePoints = prom.NewDesc("cbtflow_restore_points",
		"Committed restore points of a VM in the catalog, damaged ones included. VMs beyond the first "+
			fmt.Sprint(maxVMSeries)+" (by name, profile, UUID) are summed in the series whose labels are all \""+otherVMs+"\".",
		[]string{"vm", "vm_uuid", "profile"}, nil)
	descNewest = prom.NewDesc("cbtflow_newest_restore_point_timestamp_seconds",
		"Start time (unix seconds) of a VM's newest committed restore point in the catalog; VMs without one have no series "+
			"(alert on time() minus this for a VM without a backup for a day). VMs beyond the first "+
			fmt.Sprint(maxVMSeries)+" have one series whose labels are all \""+otherVMs+"\", holding the oldest of their newest points.",
		[]string{"vm", "vm_uuid", "profile"}, nil)
	descVerified = prom.NewDesc("cbtflow_newest_verification_timestamp_seconds",
		"Time (unix seconds) of a VM's newest verification (starter verify, the weekly cbtflow-verify schedule): "+
			"of the restore point verified last; VMs never verified have no series (alert on time() minus this for "+
			"a VM not verified for a week). VMs beyond the first "+fmt.Sprint(maxVMSeries)+" have one series whose labels are all \""+
			otherVMs+"\", holding the oldest of their newest verifications.",
		[]string{"vm", "vm_uuid", "profile"}, nil)
	descVerifiedOK = prom.NewDesc("cbtflow_verification_ok",
		"1 when a VM's newest verification found its restore point sound, 0 when it found it damaged (starter list names the problem). "+
			"VMs never verified have no series; the \""+otherVMs+"\" series is 0 when any of the VMs beyond the first "+
			fmt.Sprint(maxVMSeries)+" is.",
		[]string{"vm", "vm_uuid", "profile"}, nil)
	descUsed = prom.NewDesc("cbtflow_repository_used_bytes",
		"Bytes the restore points' images take in the repository, as the catalog records them: the space each image's file took "+
			"(images are sparse), or its size for an image recorded before that.", nil, nil)
	descFree = prom.NewDesc("cbtflow_repository_free_bytes",
		"Bytes the worker may still write on the repository's filesystem (statfs).", nil, nil)
	descSize = prom.NewDesc("cbtflow_repository_size_bytes",
		"Size of the repository's filesystem in bytes (statfs).", nil, nil)
	descCatalogUp = prom.NewDesc("cbtflow_catalog_up",
		"1 when the last reading of the catalog for these metrics worked; 0 when it failed, and the catalog's metrics are left out.", nil, nil)
)

const (
	// maxVMSeries bounds the series of cbtflow_restore_points: one per VM
	// up to it, then one for all the others.
	maxVMSeries = 500
	otherVMs    = "_other"
	// repoMetricsMaxAge is how long a reading serves scrapes.
	repoMetricsMaxAge = 10 * time.Second
	// repoMetricsTimeout bounds a reading: a catalog that does not answer
	// or a repository that hangs (a dead NFS mount) must not hold up the
	// scrape, whose other metrics are the SDK's.
	repoMetricsTimeout = 5 * time.Second
)

// repoCollector is a prometheus.Collector of the repository's metrics.
type repoCollector struct {
	cat     *catalog.Catalog
	root    string
	log     *slog.Logger
	maxVMs  int // series of cbtflow_restore_points before otherVMs
	maxAge  time.Duration
	timeout time.Duration

	mu      sync.Mutex // held by a reading; guards what follows
	read    time.Time  // when last was read
	last    repoReading
	statfs  chan spaceResult // a statfs still running, or nil
	failing [2]string        // the last errors logged: catalog, space
}

type repoReading struct {
	usage         []catalog.VMUsage
	verified      []catalog.VMVerification
	prunes, freed int64
	catalogErr    error
	space         repository.Space
	spaceErr      error
}

type spaceResult struct {
	space repository.Space
	err   error
}

func newRepoCollector(cat *catalog.Catalog, root string, log *slog.Logger) *repoCollector {
	return &repoCollector{cat: cat, root: root, log: log, maxVMs: maxVMSeries, maxAge: repoMetricsMaxAge, timeout: repoMetricsTimeout}
}

// Describe implements prometheus.Collector.
func (c *repoCollector) Describe(ch chan<- *prom.Desc) {
	for _, d := range []*prom.Desc{descPruneBytesFreed, descPrunes, descRestorePoints, descNewest, descVerified, descVerifiedOK, descUsed, descFree, descSize, descCatalogUp} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *repoCollector) Collect(ch chan<- prom.Metric) {
	r := c.reading()
	if r.catalogErr != nil {
		ch <- prom.MustNewConstMetric(descCatalogUp, prom.GaugeValue, 0)
	} else {
		ch <- prom.MustNewConstMetric(descCatalogUp, prom.GaugeValue, 1)
		ch <- prom.MustNewConstMetric(descPrunes, prom.CounterValue, float64(r.prunes))
		ch <- prom.MustNewConstMetric(descPruneBytesFreed, prom.CounterValue, float64(r.freed))
		var used, others int64
		var othersNewest time.Time // the oldest of the others' newest points
		for i, u := range r.usage {
			used += u.Bytes
			if i < c.maxVMs {
				ch <- prom.MustNewConstMetric(descRestorePoints, prom.GaugeValue, float64(u.RestorePoints), u.Name, u.UUID, u.Profile)
				if !u.Newest.IsZero() {
					ch <- prom.MustNewConstMetric(descNewest, prom.GaugeValue, unixSeconds(u.Newest), u.Name, u.UUID, u.Profile)
				}
				continue
			}
			others += u.RestorePoints
			if !u.Newest.IsZero() && (othersNewest.IsZero() || u.Newest.Before(othersNewest)) {
				othersNewest = u.Newest
			}
		}
		if len(r.usage) > c.maxVMs {
			ch <- prom.MustNewConstMetric(descRestorePoints, prom.GaugeValue, float64(others), otherVMs, otherVMs, otherVMs)
			if !othersNewest.IsZero() {
				ch <- prom.MustNewConstMetric(descNewest, prom.GaugeValue, unixSeconds(othersNewest), otherVMs, otherVMs, otherVMs)
			}
		}
		ch <- prom.MustNewConstMetric(descUsed, prom.GaugeValue, float64(used))
		c.collectVerified(ch, r)
	}
	if r.spaceErr == nil {
		ch <- prom.MustNewConstMetric(descFree, prom.GaugeValue, float64(r.space.Free))
		ch <- prom.MustNewConstMetric(descSize, prom.GaugeValue, float64(r.space.Size))
	}
}

// collectVerified sends every verified VM's newest verification: the VMs
// among the first maxVMs of the usage (the series of
// cbtflow_restore_points) have their own series, the others share one.
func (c *repoCollector) collectVerified(ch chan<- prom.Metric, r repoReading) {
	own := map[catalog.VMRef]bool{}
	for i, u := range r.usage {
		if i >= c.maxVMs {
			break
		}
		own[u.VMRef] = true
	}
	var othersAt time.Time // the oldest of the others' newest verifications
	othersOK, others := true, false
	for _, v := range r.verified {
		if own[v.VMRef] {
			ch <- prom.MustNewConstMetric(descVerified, prom.GaugeValue, unixSeconds(v.At), v.Name, v.UUID, v.Profile)
			ch <- prom.MustNewConstMetric(descVerifiedOK, prom.GaugeValue, boolValue(v.OK), v.Name, v.UUID, v.Profile)
			continue
		}
		if !others || v.At.Before(othersAt) {
			othersAt = v.At
		}
		others, othersOK = true, othersOK && v.OK
	}
	if others {
		ch <- prom.MustNewConstMetric(descVerified, prom.GaugeValue, unixSeconds(othersAt), otherVMs, otherVMs, otherVMs)
		ch <- prom.MustNewConstMetric(descVerifiedOK, prom.GaugeValue, boolValue(othersOK), otherVMs, otherVMs, otherVMs)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unixSeconds is t in seconds since the epoch, to the millisecond.
func unixSeconds(t time.Time) float64 { return float64(t.UnixMilli()) / 1000 }

// reading returns the last reading when it is fresh, else reads anew.
func (c *repoCollector) reading() repoReading {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.read.IsZero() && time.Since(c.read) < c.maxAge {
		return c.last
	}
	var r repoReading
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	r.usage, r.catalogErr = c.cat.Usage(ctx)
	if r.catalogErr == nil {
		r.prunes, r.freed, r.catalogErr = c.cat.PruneTotals(ctx)
	}
	if r.catalogErr == nil {
		r.verified, r.catalogErr = c.cat.NewestVerifications(ctx)
	}
	r.space, r.spaceErr = c.space()
	c.logChange(0, "catalog", r.catalogErr)
	c.logChange(1, "repository space", r.spaceErr)
	c.read, c.last = time.Now(), r
	return r
}

// space is the repository's statfs, given up on after the timeout: a
// statfs that hangs is left to finish on its own, and no other is started
// meanwhile.
func (c *repoCollector) space() (repository.Space, error) {
	if c.statfs != nil {
		select {
		case <-c.statfs: // a late answer to an earlier reading: too old
			c.statfs = nil
		default:
			return repository.Space{}, fmt.Errorf("statfs %s: an earlier one has not answered yet", c.root)
		}
	}
	ch := make(chan spaceResult, 1)
	c.statfs = ch
	go func() {
		sp, err := repository.SpaceOf(c.root)
		ch <- spaceResult{sp, err}
	}()
	t := time.NewTimer(c.timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		c.statfs = nil
		return r.space, r.err
	case <-t.C:
		return repository.Space{}, fmt.Errorf("statfs %s: no answer in %s", c.root, c.timeout)
	}
}

// logChange logs a reading's error when it is new, and when it is gone,
// not at every scrape.
func (c *repoCollector) logChange(i int, what string, err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	switch {
	case msg == c.failing[i]:
	case err != nil:
		c.log.Warn("metrics: cannot read the "+what+"; its metrics are left out", "error", err)
	default:
		c.log.Info("metrics: the " + what + " can be read again")
	}
	c.failing[i] = msg
}
