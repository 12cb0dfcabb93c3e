package cli

import (
	"context"
	"encoding/json"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// The real bin/starter against a stack, as an operator's script meets it:
// help on stdout with exit 0; a bad command line exits 2 naming what was
// wrong and starts nothing; a configuration flag a command does not use
// is still accepted, noted on stderr only, so stdout stays the result
// (JSON); a backup of a VM the vCenter does not have fails with exit 1.
func TestCommandLine(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const vm = "DC0_H0_VM0"

	for _, c := range []struct {
		args           []string
		code           int
		stdout, stderr string
	}{
		{[]string{"--help"}, 0, "Available Commands:", ""},
		{[]string{"help", "backup"}, 0, "Usage:\n  starter backup VM [VM...] [flags]", ""},
		{[]string{"schedule", "describe", "-h"}, 0, "Usage:\n  starter schedule describe VM", ""},
		{[]string{"--version"}, 0, runtime.Version(), ""},
		{[]string{"completion", "bash"}, 0, "bash completion", ""},
		{nil, 2, "", "no command given"},
		{[]string{"backup"}, 2, "", "starter: backup: give at least one VM, got none"},
		{[]string{"backup", vm, "--wiat"}, 2, "", "starter: backup: unknown flag: --wiat"},
		{[]string{"backup", vm, "--mode", "everything"}, 2, "", `backup: invalid --mode "everything"`},
		{[]string{"bakup", vm}, 2, "", `unknown command "bakup" for "starter"; did you mean backup?`},
		{[]string{"list", "--status", "done"}, 2, "", `list: --status "done" is not a status`},
		{[]string{"schedule", "add", vm, "--cron", "1 2 3"}, 2, "", `schedule add: --cron "1 2 3": 3 fields`},
	} {
		r := run(ctx, t, s, c.args...)
		if r.ExitCode != c.code || !strings.Contains(r.Stdout, c.stdout) || !strings.Contains(r.Stderr, c.stderr) ||
			(c.code == 2 && r.Stdout != "") || (c.code == 0 && r.Stderr != "") {
			t.Errorf("starter %s: %s\nwant exit %d, stdout with %q, stderr with %q", strings.Join(c.args, " "), r, c.code, c.stdout, c.stderr)
		}
	}
	// None of the refused command lines started anything.
	if wfs := stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'Backup'"); len(wfs) != 0 {
		t.Errorf("refused command lines started %d Backup workflows", len(wfs))
	}
	if got := list(ctx, t, s, vm); len(got) != 0 {
		t.Errorf("the catalog holds %+v after refused command lines", got)
	}

	// A flag the command ignores: noted on stderr, the JSON untouched.
	r := run(ctx, t, s, "list", vm, "--json", "--metrics-addr", "127.0.0.1:1", "--vcenters", "/nonexistent")
	var points []stacktest.ListJSON
	if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &points) != nil ||
		!strings.Contains(r.Stderr, "starter: list: --metrics-addr is ignored") || !strings.Contains(r.Stderr, "--vcenters is ignored") {
		t.Errorf("list with ignored flags: %s", r)
	}

	// A runtime failure: exit 1, "starter: " and the reason.
	r = run(ctx, t, s, "backup", "NOPE_VM", "--wait")
	if r.ExitCode != 1 || !strings.Contains(r.Stderr, "starter: backup of VM NOPE_VM:") || !strings.Contains(r.Stderr, "NOPE_VM") {
		t.Errorf("backup of an unknown VM: %s", r)
	}
}
