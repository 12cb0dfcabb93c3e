package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os/exec"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/config"
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
	err := detached(e, cfg, backupOutput{VM: "my vm", Workflow: "start-backup/lab/abc", Disks: []diskOutput{}}, true)
	var exit exitError
	if !errors.As(err, &exit) || exit.code != 4 || exit.quiet {
		t.Fatalf("detached = %#v, want an exitError with code 4 that main prints", err)
	}
	for _, want := range []string{
		"interrupted while backup of VM my vm was being started: it may go on in the background (start workflow start-backup/lab/abc)",
		"follow it: starter list 'my vm'",
		"/namespaces/backups/workflows/start-backup%2Flab%2Fabc",
		"cancel it: temporal workflow cancel --address 10.0.0.1:7233 --namespace backups --workflow-id start-backup/lab/abc",
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
	var stderr bytes.Buffer
	e := &env{stdout: io.Discard, stderr: &stderr, log: slog.New(slog.DiscardHandler), getenv: func(string) string { return "" }}
	err := backupCmd(context.Background(), e, []string{"-h"})
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("backup -h: %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"4 interrupted (Ctrl-C, SIGTERM)\nwhile the backup goes on in the background: the starter never cancels it", "Ctrl-C stops the waiting, not the backup: exit 4"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("backup -h lacks %q:\n%s", want, stderr.String())
		}
	}
}
