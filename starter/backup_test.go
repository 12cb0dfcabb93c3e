package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

// The commands the starter prints after an interrupt are pasted into a
// shell: each word must reach the program as it was.
func TestShellQuote(t *testing.T) {
	for _, s := range []string{
		"DC0_H0_VM1", "backup/lab/98e152d0-eae2-5372-a08e-7e034d392eff", "127.0.0.1:7233",
		"", "VM with spaces", "it's", `a"b`, "$(rm -rf /)", "a;b", "x\ny", "ünïcode",
	} {
		q := shellQuote(s)
		out, err := exec.Command("sh", "-c", "printf %s "+q).Output()
		if err != nil {
			t.Fatalf("sh -c printf %%s %s: %v", q, err)
		}
		if string(out) != s {
			t.Errorf("shellQuote(%q) = %s, which the shell reads as %q", s, q, out)
		}
	}
	if got := shellQuote("backup/lab/x-1"); got != "backup/lab/x-1" {
		t.Errorf("a plain word is quoted: %s", got)
	}
}

// Interrupted before the start workflow named its backup: the message
// names the start workflow instead, exit code 4, and the JSON is the
// backup as running, without an error.
func TestDetachedWithoutBackupID(t *testing.T) {
	var stdout bytes.Buffer
	e := &env{stdout: &stdout, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
	cfg := &config.Config{TemporalAddress: "10.0.0.1:7233", Namespace: "backups"}
	err := detached(e, cfg, workflows.BackupReport{VM: "my vm", WorkflowID: "start-backup/lab/abc", Disks: []workflows.DiskResult{}}, true)
	var exit exitError
	if !errors.As(err, &exit) || exit.code != 4 || exit.quiet {
		t.Fatalf("detached = %#v, want an exitError with code 4 that main prints", err)
	}
	for _, want := range []string{
		"interrupted while backup of VM my vm was being started: it may go on in the background (start workflow start-backup/lab/abc)",
		"follow it: starter watch 'my vm'",
		"starter status 'my vm'",
		"/namespaces/backups/workflows/start-backup%2Flab%2Fabc",
		"temporal workflow describe --address 10.0.0.1:7233 --namespace backups --workflow-id start-backup/lab/abc",
		"cancel it: starter cancel 'my vm'",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q:\n%s", want, err)
		}
	}
	if got, want := stdout.String(), `{"backup_id":"","vm":"my vm","vm_uuid":"","status":"running","workflow_id":"start-backup/lab/abc","disks":[]}`+"\n"; got != want {
		t.Errorf("stdout %s, want %s", got, want)
	}
}

// `starter backup -h` documents exit code 4.
func TestBackupHelpNamesExitCode4(t *testing.T) {
	r := runIn(t, "backup", "-h")
	if r.code != 0 {
		t.Fatalf("backup -h: exit %d, want 0\n%s", r.code, r.stderr)
	}
	for _, want := range []string{"4 interrupted (Ctrl-C, SIGTERM)\nwhile the backup goes on in the background: the starter never cancels it", "Ctrl-C stops the waiting, not the backup: exit 4"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("backup -h lacks %q:\n%s", want, r.stdout)
		}
	}
}

// The keys of `starter backup --json`, the contract scripts, the harnesses
// and the demo read: the object's and each disk's, always present or
// (omitempty) only when set.
var (
	backupKeys         = []string{"backup_id", "disks", "status", "vm", "vm_uuid", "workflow_id"}
	backupOptionalKeys = []string{"error", "warnings"}
	diskKeys           = []string{"change_id", "changed_bytes", "key", "mode", "path", "seconds", "size_bytes", "written_bytes"}
	diskOptionalKeys   = []string{"allocated_bytes", "note"}
	backupStatuses     = []string{workflows.ReportRunning, workflows.ReportCompleted, workflows.ReportFailed,
		workflows.ReportCanceled, workflows.ReportTerminated, workflows.ReportAlreadyRunning}
)

// The JSON the starter prints has exactly the contract's keys: a report
// with every field set has them all, an empty one only those without
// omitempty (and "disks" as [], never null). A field added to, renamed in
// or dropped from workflows.BackupReport or workflows.DiskResult fails
// here, and the README must say it.
func TestBackupJSONContract(t *testing.T) {
	full := workflows.BackupReport{
		BackupID: "b1", VM: "vm", VMUUID: "u1", Status: workflows.ReportFailed, Error: "boom",
		WorkflowID: "backup/v/u1", Warnings: []string{"w"},
		Disks: []workflows.DiskResult{{Key: 2000, Mode: workflows.ModeFull, ChangedBytes: 1, WrittenBytes: 1,
			SizeBytes: 1, AllocatedBytes: 1, Path: "/r/x.qcow2", ChangeID: "c", Seconds: 1, Note: "n"}},
	}
	empty := workflows.BackupReport{Disks: []workflows.DiskResult{{}}}
	for _, c := range []struct {
		name       string
		r          workflows.BackupReport
		top, disks []string
	}{
		{"every field set", full, slices.Concat(backupKeys, backupOptionalKeys), slices.Concat(diskKeys, diskOptionalKeys)},
		{"no field set", empty, backupKeys, diskKeys},
	} {
		var stdout bytes.Buffer
		e := &env{stdout: &stdout, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
		if err := printBackup(e, c.r, true); err != nil {
			t.Fatal(err)
		}
		var top map[string]json.RawMessage
		if err := json.Unmarshal(stdout.Bytes(), &top); err != nil {
			t.Fatalf("%s: %v: %s", c.name, err, stdout.String())
		}
		var disks []map[string]json.RawMessage
		if err := json.Unmarshal(top["disks"], &disks); err != nil || len(disks) != 1 {
			t.Fatalf("%s: disks %s: %v", c.name, top["disks"], err)
		}
		if got, want := slices.Sorted(maps.Keys(top)), slices.Sorted(slices.Values(c.top)); !slices.Equal(got, want) {
			t.Errorf("%s: keys %q, want %q", c.name, got, want)
		}
		if got, want := slices.Sorted(maps.Keys(disks[0])), slices.Sorted(slices.Values(c.disks)); !slices.Equal(got, want) {
			t.Errorf("%s: disk keys %q, want %q", c.name, got, want)
		}
	}

	var stdout bytes.Buffer
	e := &env{stdout: &stdout, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
	if err := printBackup(e, workflows.BackupReport{Disks: []workflows.DiskResult{}}, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout.String(), `"disks":[]`) {
		t.Errorf("a report without disks prints %s, want \"disks\":[]", stdout.String())
	}

	// The README's row of `starter backup` names every key and status.
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	row := ""
	for line := range strings.Lines(string(readme)) {
		if strings.HasPrefix(line, "| `starter backup VM") {
			row = line
		}
	}
	if row == "" {
		t.Fatal("README.md has no row for `starter backup VM`")
	}
	for _, k := range slices.Concat(backupKeys, backupOptionalKeys, diskKeys, diskOptionalKeys, backupStatuses) {
		if !strings.Contains(row, "`"+k+"`") {
			t.Errorf("README.md's row of `starter backup` does not name `%s`", k)
		}
	}
}

// TestPrintBackupHumanUnits: the human summary of a backup shows sizes in
// human units, like list, and a disk's note (issue 10).
func TestPrintBackupHumanUnits(t *testing.T) {
	var stdout bytes.Buffer
	e := &env{stdout: &stdout, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
	rep := workflows.BackupReport{BackupID: "b1", VM: "web", VMUUID: "u-1", Status: workflows.ReportCompleted,
		Disks: []workflows.DiskResult{{Key: 204, Mode: "full", ChangedBytes: 9 << 20, WrittenBytes: 3 << 30, SizeBytes: 1536 << 10,
			Seconds: 1.25, Path: "/r/x.qcow2", ChangeID: "c/1", Note: "chain has 3 images (limit 3)"}}}
	if err := printBackup(e, rep, false); err != nil {
		t.Fatal(err)
	}
	out := stdout.String()
	for _, want := range []string{"changed 9.0 MiB", "written 3.0 GiB", "QCOW2 1.5 MiB", "1.2s", "note: chain has 3 images (limit 3)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "9437184") {
		t.Errorf("output has a raw byte count:\n%s", out)
	}
}
