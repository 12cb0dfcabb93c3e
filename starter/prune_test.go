package main

import (
	"bytes"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestPrintPrune(t *testing.T) {
	at := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	vm := activities.VMPrunePlan{VMName: "web", VMUUID: "u-1", Policy: "keep-last 1, max-chain 30",
		Kept:        []activities.KeptPoint{{BackupID: "b3", Time: at, Rules: []string{"last 1"}}},
		Removed:     []activities.RemovedPoint{{BackupID: "b2", Time: at.Add(-time.Hour), Reason: "not kept by the policy (keep-last 1, max-chain 30)"}},
		BytesToFree: 3 << 20}
	notRemoved := vm
	notRemoved.Removed = []activities.RemovedPoint{}
	for _, c := range []struct {
		name string
		res  workflows.PruneResult
		want []string
		not  []string
	}{
		{"dry run", workflows.PruneResult{DryRun: true, VMs: []workflows.PruneVMResult{{VMPrunePlan: vm}}},
			[]string{"web (u-1): policy keep-last 1, max-chain 30", "keep", "b3", "last 1", "remove", "b2", "not kept by the policy", "would free about 3.0 MiB"},
			[]string{"removed", "freed 0"}},
		{"prune", workflows.PruneResult{BytesFreed: 5 << 20, VMs: []workflows.PruneVMResult{{VMPrunePlan: vm, BytesFreed: 5 << 20,
			Merged: []activities.MergedImage{{BackupID: "b3", Key: 204, Method: "rebase", SizeBytes: 9 << 20}}}}},
			[]string{"removed", "b2", "merged", "disk 204", "into a full image (rebase, 9.0 MiB)", "freed 5.0 MiB", "prune: 5.0 MiB freed"},
			[]string{"would free", "skipped", "failed", "planned"}},
		{"skipped", workflows.PruneResult{VMs: []workflows.PruneVMResult{{VMPrunePlan: notRemoved,
			Status: workflows.PruneStatusSkipped, Error: "a backup or prune of it is running as workflow backup/u-1; the next prune tries again",
			PlannedRemoved: vm.Removed}}},
			[]string{"web (u-1)", "keep", "b3", "planned", "b2", "skipped: a backup or prune of it is running as workflow backup/u-1", "prune: 0 B freed"},
			[]string{"removed", "  freed", "would free", "failed"}},
		{"failed", workflows.PruneResult{VMs: []workflows.PruneVMResult{{VMPrunePlan: notRemoved,
			Status: workflows.PruneStatusFailed, Error: "activity error (type: MergeImage): qemu-img: disk full",
			PlannedRemoved: vm.Removed}}},
			[]string{"web (u-1)", "keep", "b3", "planned", "b2", "failed: activity error (type: MergeImage): qemu-img: disk full"},
			[]string{"removed", "  freed", "would free", "skipped"}},
		{"nothing to remove", workflows.PruneResult{VMs: []workflows.PruneVMResult{{VMPrunePlan: notRemoved, Status: workflows.PruneStatusNothing}}},
			[]string{"web (u-1)", "keep", "b3", "nothing to remove"},
			[]string{"removed", "b2", "  freed", "skipped", "failed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var stdout bytes.Buffer
			e := &env{stdout: &stdout, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
			printPrune(e, c.res)
			out := stdout.String()
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, n := range c.not {
				if strings.Contains(out, n) {
					t.Errorf("output has %q:\n%s", n, out)
				}
			}
		})
	}
}
