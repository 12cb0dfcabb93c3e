package metrics

import (
	"strings"
	"testing"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
)

// Every backup metric is served under its name, with a help text of its
// own, and holds what it was told.
func TestBackupMetrics(t *testing.T) {
	b := NewBackup()
	reg := prom.NewRegistry()
	reg.MustRegister(b)
	b.DiskTransferred("full", 100, 60, 30, 3*time.Second)
	b.DiskTransferred("incremental", 10, 5, 0, time.Second)
	b.DiskTransferred("full", 1, 1, 1, time.Second)
	b.BackupCommitted(90*time.Second, 3<<20)
	b.SnapshotRemoved(80 * time.Second)
	b.ActivityFailed("TransferDisk", "ImageCorrupt", false)
	b.ActivityFailed("TransferDisk", "ImageCorrupt", false)
	b.VCenterCall("lab", "RetrievePropertiesEx")
	b.VCenterCall("lab", "RetrievePropertiesEx")
	b.VCenterCall("lab", "CreateSnapshot_Task")

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		if h := mf.GetHelp(); len(h) < 20 || strings.Contains(h, mf.GetName()) {
			t.Errorf("%s: help text %q", mf.GetName(), h)
		}
		for _, m := range mf.GetMetric() {
			series := mf.GetName()
			for _, l := range m.GetLabel() {
				series += "/" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[series] = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				got[series+"/count"] = float64(m.GetHistogram().GetSampleCount())
				got[series+"/sum"] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	for series, want := range map[string]float64{
		"cbtflow_transfer_read_bytes_total/full":                          101,
		"cbtflow_transfer_written_bytes_total/full":                       61,
		"cbtflow_transfer_zeroed_bytes_total/full":                        31,
		"cbtflow_transfer_read_bytes_total/incremental":                   10,
		"cbtflow_transfer_duration_seconds/full/count":                    2,
		"cbtflow_transfer_duration_seconds/full/sum":                      4,
		"cbtflow_transfer_duration_seconds/incremental/count":             1,
		"cbtflow_backup_duration_seconds/count":                           1,
		"cbtflow_backup_duration_seconds/sum":                             90,
		"cbtflow_backup_changed_bytes/sum":                                3 << 20,
		"cbtflow_snapshot_age_seconds/sum":                                80,
		"cbtflow_activity_failures_total/TransferDisk/false/ImageCorrupt": 2, // labels by name
		"cbtflow_vcenter_calls_total/RetrievePropertiesEx/lab":            2,
		"cbtflow_vcenter_calls_total/CreateSnapshot_Task/lab":             1,
	} {
		if got[series] != want {
			t.Errorf("%s = %v, want %v", series, got[series], want)
		}
	}
	if len(names) != 9 {
		t.Errorf("metrics gathered: %v, want 9", names)
	}
}
