package activities

import (
	"context"
	"errors"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
)

// Metrics receives what the activities measure of backups; the worker's
// is metrics.Backup, served on its /metrics. The activities only report:
// they know nothing of how the numbers are served. Workflows report
// nothing (they must stay deterministic).
type Metrics interface {
	// DiskTransferred: a TransferDisk attempt succeeded, in mode (full,
	// incremental), having read, written (data) and zeroed these bytes
	// in d.
	DiskTransferred(mode string, read, written, zeroed int64, d time.Duration)
	// BackupCommitted: CommitRestorePoint committed a backup that began d
	// ago and whose disks changed changedBytes.
	BackupCommitted(d time.Duration, changedBytes int64)
	// SnapshotRemoved: RemoveSnapshot removed a snapshot of this age.
	SnapshotRemoved(age time.Duration)
	// ActivityFailed: an attempt of the activity failed with an error of
	// errType (see ErrorType); retryable says whether Temporal retries it.
	ActivityFailed(activity, errType string, retryable bool)
}

// metricsOr returns m, or a Metrics that drops everything when m is nil.
func metricsOr(m Metrics) Metrics {
	if m == nil {
		return noMetrics{}
	}
	return m
}

type noMetrics struct{}

func (noMetrics) DiskTransferred(string, int64, int64, int64, time.Duration) {}
func (noMetrics) BackupCommitted(time.Duration, int64)                       {}
func (noMetrics) SnapshotRemoved(time.Duration)                              {}
func (noMetrics) ActivityFailed(string, string, bool)                        {}

// backupIDTimeLayout is the timestamp that starts a backup ID: the
// backup's workflow's start time (workflows.newBackupID).
const backupIDTimeLayout = "20060102T150405Z"

// BackupStart returns the time a backup began, read from its ID's
// timestamp prefix; false when the ID has none (an ID given by hand).
func BackupStart(backupID string) (time.Time, bool) {
	if len(backupID) < len(backupIDTimeLayout) {
		return time.Time{}, false
	}
	t, err := time.Parse(backupIDTimeLayout, backupID[:len(backupIDTimeLayout)])
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// ErrorType is the type of an activity's error for the failure metric:
// the ApplicationError's type, "Canceled", or "other" (an error the SDK
// wraps itself, retried).
func ErrorType(err error) (errType string, retryable bool) {
	var app *temporal.ApplicationError
	switch {
	case errors.As(err, &app):
		t := app.Type()
		if t == "" {
			t = "other"
		}
		return t, !app.NonRetryable()
	case temporal.IsCanceledError(err), errors.Is(err, context.Canceled):
		return "Canceled", false
	}
	return "other", true
}

// FailureInterceptor is a worker interceptor that reports every failed
// activity attempt to m (Metrics.ActivityFailed), by activity type and
// error type: one place for every activity, not each failure site.
func FailureInterceptor(m Metrics) interceptor.WorkerInterceptor {
	return &failureInterceptor{m: metricsOr(m)}
}

type failureInterceptor struct {
	interceptor.WorkerInterceptorBase
	m Metrics
}

func (f *failureInterceptor) InterceptActivity(ctx context.Context, next interceptor.ActivityInboundInterceptor) interceptor.ActivityInboundInterceptor {
	return &failureActivity{ActivityInboundInterceptorBase: interceptor.ActivityInboundInterceptorBase{Next: next}, m: f.m}
}

type failureActivity struct {
	interceptor.ActivityInboundInterceptorBase
	m Metrics
}

func (f *failureActivity) ExecuteActivity(ctx context.Context, in *interceptor.ExecuteActivityInput) (any, error) {
	res, err := f.Next.ExecuteActivity(ctx, in)
	if err != nil && !errors.Is(err, activity.ErrResultPending) {
		t, retryable := ErrorType(err)
		f.m.ActivityFailed(activity.GetInfo(ctx).ActivityType.Name, t, retryable)
	}
	return res, err
}
