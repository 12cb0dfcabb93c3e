package activities_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
)

// recordedMetrics is an activities.Metrics that keeps what it is told.
type recordedMetrics struct {
	mu        sync.Mutex
	transfers []recordedTransfer
	commits   []recordedCommit
	snapshots []time.Duration
	failures  []string // activity/type/retryable
}

type recordedTransfer struct {
	mode                  string
	read, written, zeroed int64
	took                  time.Duration
}

type recordedCommit struct {
	took    time.Duration
	changed int64
}

func (m *recordedMetrics) DiskTransferred(mode string, read, written, zeroed int64, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.transfers = append(m.transfers, recordedTransfer{mode, read, written, zeroed, d})
}

func (m *recordedMetrics) BackupCommitted(d time.Duration, changed int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.commits = append(m.commits, recordedCommit{d, changed})
}

func (m *recordedMetrics) SnapshotRemoved(age time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.snapshots = append(m.snapshots, age)
}

func (m *recordedMetrics) ActivityFailed(activity, errType string, retryable bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := "retryable"
	if !retryable {
		r = "final"
	}
	m.failures = append(m.failures, activity+"/"+errType+"/"+r)
}

func TestBackupStart(t *testing.T) {
	got, ok := activities.BackupStart("20261203T144411Z-0123456789ab")
	if want := time.Date(2026, 12, 3, 14, 44, 11, 0, time.UTC); !ok || !got.Equal(want) {
		t.Errorf("BackupStart: %v %v, want %v", got, ok, want)
	}
	for _, id := range []string{"", "c1", "manual-backup-of-vm-a", "20261303T144411Z-x"} {
		if got, ok := activities.BackupStart(id); ok {
			t.Errorf("BackupStart(%q) = %v, want none", id, got)
		}
	}
}

func TestErrorType(t *testing.T) {
	for _, c := range []struct {
		err       error
		typ       string
		retryable bool
	}{
		{temporal.NewNonRetryableApplicationError("full", activities.ErrTypeRepositoryFull, nil), activities.ErrTypeRepositoryFull, false},
		{temporal.NewApplicationError("corrupt", activities.ErrTypeImageCorrupt), activities.ErrTypeImageCorrupt, true},
		{context.Canceled, "Canceled", false},
		{errors.New("boom"), "other", true},
	} {
		if typ, r := activities.ErrorType(c.err); typ != c.typ || r != c.retryable {
			t.Errorf("ErrorType(%v) = %s %v, want %s %v", c.err, typ, r, c.typ, c.retryable)
		}
	}
}

// probe is an activity that fails as it is told.
type probe struct{}

func (*probe) Probe(_ context.Context, fail string) error {
	switch fail {
	case "":
		return nil
	case "plain":
		return errors.New("plain")
	}
	return temporal.NewNonRetryableApplicationError("no", fail, nil)
}

// The failure interceptor counts each failed attempt by activity and
// error type, and nothing for a success.
func TestFailureInterceptor(t *testing.T) {
	m := &recordedMetrics{}
	p := &probe{}
	env := newActivityEnv(t, slog.New(slog.DiscardHandler), p)
	env.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{activities.FailureInterceptor(m)}})
	for _, fail := range []string{"", "plain", activities.ErrTypeRepositoryFull} {
		_, err := env.ExecuteActivity(p.Probe, fail)
		if (err != nil) != (fail != "") {
			t.Fatalf("probe %q: %v", fail, err)
		}
	}
	want := []string{"Probe/other/retryable", "Probe/" + activities.ErrTypeRepositoryFull + "/final"}
	if len(m.failures) != len(want) || m.failures[0] != want[0] || m.failures[1] != want[1] {
		t.Errorf("failures recorded: %v, want %v", m.failures, want)
	}
}
