package cli

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// `starter backup` of several VMs, as an operator's script meets it: each
// VM gets its own backup, reported as one JSON object per line; one VM
// that fails does not stop the others, and the exit code and stderr say
// it. A bad list starts nothing.
func TestBackupOfSeveralVMs(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const vm0, vm1, nope = "DC0_H0_VM0", "DC0_H0_VM1", "NOPE_VM"

	// A VM given twice, or an empty name: exit 2, nothing started.
	for _, c := range []struct {
		args   []string
		stderr string
	}{
		{[]string{"backup", vm0, vm1, vm0}, `starter: backup: VM "DC0_H0_VM0" is given twice`},
		{[]string{"backup", vm0, " "}, "starter: backup: VM 2 of 2 is empty"},
	} {
		if r := run(ctx, t, s, c.args...); r.ExitCode != 2 || r.Stdout != "" || !strings.Contains(r.Stderr, c.stderr) {
			t.Errorf("starter %s: %s\nwant exit 2 and %q", strings.Join(c.args, " "), r, c.stderr)
		}
	}
	if wfs := stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'Backup'"); len(wfs) != 0 {
		t.Fatalf("refused command lines started %d Backup workflows", len(wfs))
	}

	// Two VMs and one the vCenter does not have, waited for.
	r := run(ctx, t, s, "backup", vm0, nope, vm1, "--wait", "--json")
	reports := decodeLines(t, r.Stdout)
	byVM := map[string]workflows.BackupReport{}
	for _, rep := range reports {
		byVM[rep.VM] = rep
	}
	if r.ExitCode != 1 || len(reports) != 3 || len(byVM) != 3 {
		t.Fatalf("backup of %s, %s and %s: want exit 1 and 3 reports: %s", vm0, nope, vm1, r)
	}
	for _, vm := range []string{vm0, vm1} {
		rep := byVM[vm]
		if rep.Status != workflows.ReportCompleted || rep.BackupID == "" || len(rep.Disks) == 0 {
			t.Errorf("VM %s: %+v, want completed with its disks", vm, rep)
		}
		for _, d := range rep.Disks {
			if d.Mode != workflows.ModeFull || d.Path == "" || d.ChangeID == "" {
				t.Errorf("VM %s: disk %+v, want a full backup with its image and change ID", vm, d)
			}
		}
		if pts := list(ctx, t, s, vm); len(pts) != 1 || pts[0].BackupID != rep.BackupID || pts[0].Status != "committed" {
			t.Errorf("VM %s: the catalog holds %+v, want its restore point %s", vm, pts, rep.BackupID)
		}
	}
	if rep := byVM[nope]; rep.Status != workflows.ReportFailed || !strings.Contains(rep.Error, nope) {
		t.Errorf("VM %s: %+v, want failed naming it", nope, rep)
	}
	for _, want := range []string{"starter: backup of VM " + nope + ":", "starter: backup of 3 VMs: 2 completed, 1 failed"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.Stderr)
		}
	}

	// Without --wait: exit 0 once both started, each reported running;
	// they then complete as incrementals.
	r = run(ctx, t, s, "backup", vm1, vm0, "--json")
	reports = decodeLines(t, r.Stdout)
	if r.ExitCode != 0 || len(reports) != 2 || !strings.Contains(r.Stderr, "starter: backup of 2 VMs: 2 started") {
		t.Fatalf("backup of %s and %s without --wait: %s", vm1, vm0, r)
	}
	vms := []string{}
	for _, rep := range reports {
		vms = append(vms, rep.VM)
		if rep.Status != workflows.ReportRunning || rep.WorkflowID == "" {
			t.Fatalf("VM %s: %+v, want running with its workflow", rep.VM, rep)
		}
		var res workflows.BackupVMResult
		if err := s.Client().GetWorkflow(ctx, rep.WorkflowID, "").Get(ctx, &res); err != nil {
			t.Fatalf("VM %s: %v", rep.VM, err)
		}
		if res.BackupID != rep.BackupID || len(res.Disks) == 0 || res.Disks[0].Mode != workflows.ModeIncremental {
			t.Errorf("VM %s: %+v, want the incremental backup %s", rep.VM, res, rep.BackupID)
		}
	}
	if slices.Sort(vms); !slices.Equal(vms, []string{vm0, vm1}) {
		t.Errorf("reports of %q, want one of each VM", vms)
	}
}

// decodeLines decodes JSON Lines of backup reports.
func decodeLines(t *testing.T, stdout string) []workflows.BackupReport {
	t.Helper()
	var out []workflows.BackupReport
	for line := range strings.Lines(stdout) {
		var rep workflows.BackupReport
		if err := json.Unmarshal([]byte(line), &rep); err != nil {
			t.Fatalf("stdout line %q is not a JSON report: %v\n%s", line, err, stdout)
		}
		out = append(out, rep)
	}
	return out
}
