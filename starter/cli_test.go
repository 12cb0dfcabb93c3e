package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// inProcess is the outcome of a command line run in process.
type inProcess struct {
	stdout, stderr string
	err            error // what the command tree returned
	code           int   // the exit code main would exit with
}

// runIn runs the starter's command line in process, as main does.
func runIn(t *testing.T, args ...string) inProcess {
	t.Helper()
	var stdout, stderr bytes.Buffer
	e := &env{stdout: &stdout, stderr: &stderr, log: slog.New(slog.DiscardHandler), getenv: func(string) string { return "" }}
	cmd, err := runCommand(context.Background(), e, args)
	code := report(e, cmd, err)
	return inProcess{stdout: stdout.String(), stderr: stderr.String(), err: err, code: code}
}

// allCommands walks the command tree: every command's path below the
// root ("backup", "schedule add", ...), the root as "".
func allCommands(c *cobra.Command) []string {
	var out []string
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		out = append(out, strings.Join(path, " "))
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string(nil), path...), sub.Name()))
		}
	}
	walk(c, nil)
	return out
}

// --help and -h of every command, the root and cobra's own (help,
// completion) included: help on stdout, nothing on stderr, exit 0.
func TestHelpOfEveryCommand(t *testing.T) {
	e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, log: slog.New(slog.DiscardHandler), getenv: func(string) string { return "" }}
	paths := allCommands(newRootCmd(e))
	for _, want := range []string{"", "backup", "list", "restore", "schedule", "schedule add", "schedule list", "schedule delete",
		"retention set", "retention show", "retention clear", "prune", "repo", "setup", "sweep", "lab serve", "lab write", "lab read",
		"completion", "completion bash", "help"} {
		if !strings.Contains("\n"+strings.Join(paths, "\n")+"\n", "\n"+want+"\n") {
			t.Errorf("the command tree lacks %q: %q", want, paths)
		}
	}
	for _, p := range paths {
		for _, h := range []string{"--help", "-h"} {
			args := append(strings.Fields(p), h)
			r := runIn(t, args...)
			if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "Usage:\n  starter") {
				t.Errorf("starter %s: exit %d, stderr %q, stdout:\n%s\nwant exit 0 and the help on stdout", strings.Join(args, " "), r.code, r.stderr, r.stdout)
			}
		}
	}
	// One style: every command's help names its long flags as --name.
	r := runIn(t, "retention", "set", "--help")
	if !strings.Contains(r.stdout, "--keep-last N") || strings.Contains(r.stdout, " -keep-last") {
		t.Errorf("retention set --help:\n%s", r.stdout)
	}
}

// Usage errors exit 2 with a message naming what was wrong, on stderr,
// and nothing on stdout.
func TestUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"Usage:\n  starter [command]", "starter: no command given"}},
		{[]string{"bakup", "VM"}, []string{`starter: unknown command "bakup" for "starter"; did you mean backup?`, "Run 'starter --help' for usage."}},
		{[]string{"bakup", "--wait"}, []string{`unknown command "bakup" for "starter"`}},
		{[]string{"--bogus"}, []string{"unknown flag: --bogus"}},
		{[]string{"backup", "VM", "--bogus"}, []string{"starter: backup: unknown flag: --bogus", "Run 'starter backup --help' for usage."}},
		{[]string{"backup"}, []string{"starter: backup: give at least one VM, got none"}},
		{[]string{"backup", "a", "b", "a"}, []string{`backup: VM "a" is given twice`}},
		{[]string{"backup", "a", ""}, []string{`backup: VM 2 of 2 is empty`}},
		{[]string{"backup", "VM", "--mode", "fast"}, []string{`backup: invalid --mode "fast"`}},
		{[]string{"backup", "VM", "--wait=maybe"}, []string{`invalid argument "maybe" for "--wait" flag`}},
		{[]string{"schedule"}, []string{"Usage:\n  starter schedule [command]", "schedule: no command given"}},
		{[]string{"schedule", "nope"}, []string{`unknown command "nope" for "starter schedule"`}},
		{[]string{"schedule", "add", "VM", "--every", "1x"}, []string{`schedule add: invalid argument "1x" for "--every" flag`}},
		{[]string{"list", "--status", "done"}, []string{`list: --status "done" is not a status`}},
		{[]string{"list", "a", "b"}, []string{"list: at most one VM, got 2"}},
		{[]string{"restore", "ID", "--disk", "x", "--to", "f"}, []string{`restore: --disk "x" is not a device key`}},
		{[]string{"completion", "tcsh"}, []string{`"tcsh"`}},
		{[]string{"lab", "read", "--vm", "v", "--disk", "204"}, []string{"no lab URL"}},
	} {
		r := runIn(t, c.args...)
		if r.code != 2 {
			t.Errorf("starter %s: exit %d, want 2; stderr:\n%s", strings.Join(c.args, " "), r.code, r.stderr)
		}
		if r.stdout != "" {
			t.Errorf("starter %s: stdout %q, want nothing", strings.Join(c.args, " "), r.stdout)
		}
		for _, w := range c.want {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("starter %s: stderr lacks %q:\n%s", strings.Join(c.args, " "), w, r.stderr)
			}
		}
	}
}

// A runtime error exits 1, prefixed "starter: ".
func TestRuntimeErrorExits1(t *testing.T) {
	r := runIn(t, "list", "--database-url", "postgres://127.0.0.1:1/none?connect_timeout=2")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "starter: ") {
		t.Errorf("list against no database: exit %d, stderr %q; want 1 and starter: ...", r.code, r.stderr)
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "-v"} {
		r := runIn(t, arg)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("%s: exit %d, stderr %s", arg, r.code, r.stderr)
		}
		line := strings.TrimSuffix(r.stdout, "\n")
		if !strings.HasPrefix(line, "starter dev (commit ") || !strings.Contains(line, runtime.Version()) || strings.Contains(line, "\n") {
			t.Errorf("%s: %q, want one line: starter dev (commit ...) %s ...", arg, r.stdout, runtime.Version())
		}
	}
}

func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{"bash": "# bash completion V2 for starter", "zsh": "#compdef starter", "fish": "# fish completion for starter"} {
		r := runIn(t, "completion", shell)
		if r.code != 0 || !strings.Contains(r.stdout, want) {
			t.Errorf("completion %s: exit %d, stdout starts %q, want %q", shell, r.code, r.stdout[:min(len(r.stdout), 80)], want)
		}
	}
}

// A command lists only the flags it uses: backup talks to Temporal, list
// reads the catalog; the worker's --metrics-addr and --vcenters are
// listed nowhere, and still accepted (ignored, with a note on stderr) so scripts
// that passed them keep working.
func TestFlagsListedWhereUsed(t *testing.T) {
	for _, c := range []struct {
		cmd       []string
		want, not []string
	}{
		{[]string{"backup"}, []string{"--temporal-address", "--namespace", "--profile", "--wait", "--json"},
			[]string{"--metrics-addr", "--vcenters", "--database-url", "--repository"}},
		{[]string{"list"}, []string{"--database-url", "--repository", "--json", "--status"},
			[]string{"--metrics-addr", "--vcenters", "--temporal-address", "--namespace"}},
		{[]string{"retention", "show"}, []string{"--database-url", "--json"}, []string{"--metrics-addr", "--temporal-address", "--repository"}},
		{[]string{"schedule", "list"}, []string{"--temporal-address", "--json"}, []string{"--metrics-addr", "--database-url"}},
		{[]string{"lab", "serve"}, []string{"--listen"}, []string{"--metrics-addr", "--temporal-address", "--database-url"}},
	} {
		r := runIn(t, append(c.cmd, "--help")...)
		for _, w := range c.want {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("%v --help does not list %s:\n%s", c.cmd, w, r.stdout)
			}
		}
		for _, n := range c.not {
			if strings.Contains(r.stdout, n) {
				t.Errorf("%v --help lists %s:\n%s", c.cmd, n, r.stdout)
			}
		}
	}
	r := runIn(t, "list", "--metrics-addr", "x", "--status", "nope")
	if r.code != 2 || r.stdout != "" || !strings.Contains(r.stderr, "starter: list: --metrics-addr is ignored: starter list does not use it") {
		t.Errorf("list --metrics-addr: exit %d, stdout %q, stderr %s", r.code, r.stdout, r.stderr)
	}
}

// Every listing command has --json.
func TestListingsHaveJSON(t *testing.T) {
	for _, c := range [][]string{{"list"}, {"repo"}, {"retention", "show"}, {"schedule", "list"}, {"backup"}, {"prune"}} {
		r := runIn(t, append(c, "--help")...)
		if !strings.Contains(r.stdout, "--json") {
			t.Errorf("%v has no --json", c)
		}
	}
}

// The built binary: help on stdout with exit 0, a bad command line exit
// 2, and --version with the version set at link time.
func TestBinaryExitCodesAndVersion(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "starter")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v9.9.9", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, c := range []struct {
		args           []string
		code           int
		stdout, stderr string
	}{
		{[]string{"--help"}, 0, "Available Commands:", ""},
		{[]string{"schedule", "add", "-h"}, 0, "Usage:\n  starter schedule add VM", ""},
		{[]string{"--version"}, 0, "starter v9.9.9 (commit ", ""},
		{nil, 2, "", "starter: no command given"},
		{[]string{"bakup"}, 2, "", `unknown command "bakup"`},
		{[]string{"list", "--nope"}, 2, "", "unknown flag: --nope"},
	} {
		cmd := exec.Command(bin, c.args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != c.code || !strings.Contains(stdout.String(), c.stdout) || !strings.Contains(stderr.String(), c.stderr) ||
			(c.stdout == "" && stdout.Len() > 0) || (c.stderr == "" && stderr.Len() > 0) {
			t.Errorf("starter %v: exit %d\nstdout: %s\nstderr: %s\nwant exit %d, stdout with %q, stderr with %q",
				c.args, code, stdout.String(), stderr.String(), c.code, c.stdout, c.stderr)
		}
		if c.args != nil && c.args[0] == "--version" && !strings.Contains(stdout.String(), runtime.Version()) {
			t.Errorf("--version lacks the Go version: %s", stdout.String())
		}
	}
}

// The help shows the defaults taken from the environment, but never a
// database password (config.RedactDatabaseURL).
func TestHelpRedactsTheDatabasePassword(t *testing.T) {
	t.Setenv("CBTFLOW_DATABASE_URL", "postgres://u:secret@db/cbtflow")
	r := runIn(t, "list", "--help")
	if strings.Contains(r.stdout, "secret") || !strings.Contains(r.stdout, "postgres://u:xxxxx@db/cbtflow") {
		t.Errorf("list --help:\n%s", r.stdout)
	}
	if r := runIn(t, "setup", "--help"); !strings.Contains(r.stdout, "(default 15m)") || strings.Contains(r.stdout, "15m0s") {
		t.Errorf("setup --help shows durations so:\n%s", r.stdout)
	}
}

// Long flags with one dash, as the flag package took them before the
// starter used cobra, still work.
func TestGoStyleFlags(t *testing.T) {
	if r := runIn(t, "backup", "-help"); r.code != 0 || !strings.Contains(r.stdout, "Usage:\n  starter backup VM") {
		t.Errorf("backup -help: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := runIn(t, "list", "-status", "nope", "-json"); r.code != 2 || !strings.Contains(r.stderr, `list: --status "nope" is not a status`) {
		t.Errorf("list -status nope: exit %d\n%s", r.code, r.stderr)
	}
	if r := runIn(t, "schedule", "add", "VM", "-every=30s"); r.code != 2 || !strings.Contains(r.stderr, "--every 30s is shorter than a minute") {
		t.Errorf("schedule add VM -every=30s: exit %d\n%s", r.code, r.stderr)
	}
	if r := runIn(t, "-version"); r.code != 0 || !strings.HasPrefix(r.stdout, "starter dev") {
		t.Errorf("-version: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Not a flag of the command: left alone (and refused); a negative
	// number stays a value.
	if r := runIn(t, "backup", "VM", "-wiat"); r.code != 2 || !strings.Contains(r.stderr, "unknown shorthand flag: 'w' in -wiat") {
		t.Errorf("backup VM -wiat: exit %d\n%s", r.code, r.stderr)
	}
	if got := goStyleFlags(newRootCmd(&env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, log: slog.New(slog.DiscardHandler), getenv: func(string) string { return "" }}),
		[]string{"retention", "set", "web", "-keep-daily", "-1", "-profile", "lab", "--", "-json"}); strings.Join(got, " ") !=
		"retention set web --keep-daily -1 --profile lab -- -json" {
		t.Errorf("goStyleFlags: %q", got)
	}
}
