package metrics

import (
	"strconv"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
)

// Backup holds cbtflow's own metrics of backups, which the activities
// report to (it implements activities.Metrics): registered with
// client_golang directly rather than through the tally scope, whose
// Prometheus reporter gives every metric a help text of its name only.
// A Server registers its Backup on its endpoint (Server.Backup).
type Backup struct {
	read, written, zeroed *prom.CounterVec
	transferSeconds       *prom.HistogramVec
	backupSeconds         prom.Histogram
	changedBytes          prom.Histogram
	snapshotAge           prom.Histogram
	failures              *prom.CounterVec
	vcenterCalls          *prom.CounterVec
}

// durationBuckets (seconds) run from 1 s to about 9 h.
var durationBuckets = prom.ExponentialBuckets(1, 2, 16)

// NewBackup returns the backup metrics, every one at zero.
func NewBackup() *Backup {
	mode := []string{"mode"}
	return &Backup{
		read: prom.NewCounterVec(prom.CounterOpts{Name: "cbtflow_transfer_read_bytes_total",
			Help: "Bytes disk transfers read from the VMs' snapshots, by the disk's mode (full, incremental); counted when a transfer attempt succeeds."}, mode),
		written: prom.NewCounterVec(prom.CounterOpts{Name: "cbtflow_transfer_written_bytes_total",
			Help: "Bytes of data disk transfers wrote into the repository's images (zeroes not included), by the disk's mode (full, incremental); counted when a transfer attempt succeeds."}, mode),
		zeroed: prom.NewCounterVec(prom.CounterOpts{Name: "cbtflow_transfer_zeroed_bytes_total",
			Help: "Bytes disk transfers wrote as zeroes (NBD write-zeroes) into the repository's images, by the disk's mode (full, incremental); counted when a transfer attempt succeeds."}, mode),
		transferSeconds: prom.NewHistogramVec(prom.HistogramOpts{Name: "cbtflow_transfer_duration_seconds",
			Help:    "Seconds a successful disk transfer attempt (TransferDisk) took, waiting for a transfer slot included, by the disk's mode (full, incremental).",
			Buckets: durationBuckets}, mode),
		backupSeconds: prom.NewHistogram(prom.HistogramOpts{Name: "cbtflow_backup_duration_seconds",
			Help:    "Seconds from a backup's start (its workflow's start, the backup ID's timestamp) to the commit of its restore point.",
			Buckets: durationBuckets}),
		changedBytes: prom.NewHistogram(prom.HistogramOpts{Name: "cbtflow_backup_changed_bytes",
			Help:    "Changed bytes of a committed backup, all its disks together (a full disk counts its allocated areas).",
			Buckets: prom.ExponentialBuckets(1<<20, 4, 12)}),
		snapshotAge: prom.NewHistogram(prom.HistogramOpts{Name: "cbtflow_snapshot_age_seconds",
			Help:    "Seconds a backup's VM snapshot had existed when cbtflow removed it, counted from the backup's start (the backup ID's timestamp).",
			Buckets: durationBuckets}),
		failures: prom.NewCounterVec(prom.CounterOpts{Name: "cbtflow_activity_failures_total",
			Help: "Failed activity attempts, by activity, error type (the ApplicationError type, Canceled, or other) and whether Temporal retries them (retryable: true, false)."},
			[]string{"activity", "type", "retryable"}),
		vcenterCalls: prom.NewCounterVec(prom.CounterOpts{Name: "cbtflow_vcenter_calls_total",
			Help: "Calls the worker made to a vCenter's API, by vCenter profile and method (RetrievePropertiesEx, CreateSnapshot_Task, QueryChangedDiskAreas, ...), logins and keep-alives included."},
			[]string{"vcenter", "method"}),
	}
}

func (b *Backup) collectors() []prom.Collector {
	return []prom.Collector{b.read, b.written, b.zeroed, b.transferSeconds, b.backupSeconds, b.changedBytes, b.snapshotAge, b.failures, b.vcenterCalls}
}

// Describe implements prometheus.Collector.
func (b *Backup) Describe(ch chan<- *prom.Desc) {
	for _, c := range b.collectors() {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (b *Backup) Collect(ch chan<- prom.Metric) {
	for _, c := range b.collectors() {
		c.Collect(ch)
	}
}

// DiskTransferred records a successful disk transfer attempt.
func (b *Backup) DiskTransferred(mode string, read, written, zeroed int64, d time.Duration) {
	b.read.WithLabelValues(mode).Add(float64(max(read, 0)))
	b.written.WithLabelValues(mode).Add(float64(max(written, 0)))
	b.zeroed.WithLabelValues(mode).Add(float64(max(zeroed, 0)))
	b.transferSeconds.WithLabelValues(mode).Observe(d.Seconds())
}

// BackupCommitted records a committed backup: its duration and its
// changed bytes.
func (b *Backup) BackupCommitted(d time.Duration, changedBytes int64) {
	b.backupSeconds.Observe(max(d.Seconds(), 0))
	b.changedBytes.Observe(float64(max(changedBytes, 0)))
}

// SnapshotRemoved records the age of a removed snapshot.
func (b *Backup) SnapshotRemoved(age time.Duration) {
	b.snapshotAge.Observe(max(age.Seconds(), 0))
}

// ActivityFailed records a failed activity attempt.
func (b *Backup) ActivityFailed(activity, errType string, retryable bool) {
	b.failures.WithLabelValues(activity, errType, strconv.FormatBool(retryable)).Inc()
}

// VCenterCall counts a call to a vCenter (vsphere.SessionOptions.OnCall).
func (b *Backup) VCenterCall(profile, method string) {
	b.vcenterCalls.WithLabelValues(profile, method).Inc()
}
