package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// retentionDB returns a fresh catalog database holding the given VMs
// (profile, instance UUID, name), each with one backup begun, which is
// what puts a VM into the catalog.
func retentionDB(t *testing.T, vms ...[3]string) string {
	t.Helper()
	url := testutil.Database(t)
	ctx := context.Background()
	cat, err := catalog.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	for _, v := range vms {
		b := catalog.Backup{ID: "b-" + v[0] + "-" + v[1], Profile: v[0], VMUUID: v[1], VMName: v[2], Mode: "auto"}
		if err := cat.Begin(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	return url
}

// retentionRun runs `starter retention ARGS --database-url URL` in
// process and returns its stdout and error.
func retentionRun(t *testing.T, url string, args ...string) (string, error) {
	t.Helper()
	r := runIn(t, append([]string{"retention"}, append(args, "--database-url", url)...)...)
	return r.stdout, r.err
}

// mustRun runs a retention command that must succeed and returns its
// stdout.
func mustRun(t *testing.T, url string, args ...string) string {
	t.Helper()
	out, err := retentionRun(t, url, args...)
	if err != nil {
		t.Fatalf("retention %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func TestRetentionSetShowClear(t *testing.T) {
	url := retentionDB(t, [3]string{"lab", "u-0", "DC0_H0_VM0"}, [3]string{"lab", "u-1", "DC0_H0_VM1"})
	check := func(step, got, want string) {
		t.Helper()
		if got != want {
			t.Errorf("%s:\n%s\nwant:\n%s", step, got, want)
		}
	}

	check("show of a catalog without policies", mustRun(t, url, "show"), `default: none: a VM without a policy of its own keeps everything
VM          PROFILE  UUID  SOURCE  POLICY
DC0_H0_VM0  lab      u-0   none    keeps everything (max-chain 30)
DC0_H0_VM1  lab      u-1   none    keeps everything (max-chain 30)
`)
	check("set on a VM", mustRun(t, url, "set", "DC0_H0_VM0", "--keep-last", "2"), "DC0_H0_VM0: keep-last 2, max-chain 30\n")
	check("set the default", mustRun(t, url, "set", "--default", "--keep-daily", "7", "--keep-weekly", "4", "--max-chain", "10"),
		"default: keep-daily 7, keep-weekly 4, max-chain 10\n")
	check("set by UUID, flags first", mustRun(t, url, "set", "--keep-monthly", "6", "--keep-yearly", "2", "u-1"),
		"DC0_H0_VM1: keep-monthly 6, keep-yearly 2, max-chain 30\n")
	// A second set replaces the whole policy.
	check("set again", mustRun(t, url, "set", "DC0_H0_VM0", "--keep-last", "3"), "DC0_H0_VM0: keep-last 3, max-chain 30\n")
	check("show", mustRun(t, url, "show"), `default: keep-daily 7, keep-weekly 4, max-chain 10
VM          PROFILE  UUID  SOURCE  POLICY
DC0_H0_VM0  lab      u-0   vm      keep-last 3, max-chain 30
DC0_H0_VM1  lab      u-1   vm      keep-monthly 6, keep-yearly 2, max-chain 30
`)
	check("show VM", mustRun(t, url, "show", "DC0_H0_VM0"), "DC0_H0_VM0 (profile lab, uuid u-0): keep-last 3, max-chain 30 (its own policy)\n")

	check("clear a VM", mustRun(t, url, "clear", "DC0_H0_VM0"),
		"DC0_H0_VM0: policy removed; the default applies: keep-daily 7, keep-weekly 4, max-chain 10\n")
	check("clear it again", mustRun(t, url, "clear", "DC0_H0_VM0"),
		"DC0_H0_VM0: had no policy of its own; the default applies: keep-daily 7, keep-weekly 4, max-chain 10\n")
	check("show VM after clear", mustRun(t, url, "show", "u-0"),
		"DC0_H0_VM0 (profile lab, uuid u-0): keep-daily 7, keep-weekly 4, max-chain 10 (the default policy)\n")
	check("clear the default", mustRun(t, url, "clear", "--default"),
		"default: removed; a VM without a policy of its own now keeps everything\n")
	check("clear the default again", mustRun(t, url, "clear", "--default"),
		"default: there was none; a VM without a policy of its own keeps everything\n")
	check("show VM without any policy", mustRun(t, url, "show", "DC0_H0_VM0"),
		"DC0_H0_VM0 (profile lab, uuid u-0): keeps everything: no policy of its own and no default (max-chain 30)\n")
	check("clear the last VM policy", mustRun(t, url, "clear", "DC0_H0_VM1"),
		"DC0_H0_VM1: policy removed; it keeps everything (no default policy; max-chain 30)\n")
}

// The keys of `starter retention show --json`, a contract the README
// documents.
var (
	retentionShowKeys = []string{"default", "vms"}
	retentionVMKeys   = []string{"policy", "profile", "source", "vm", "vm_uuid"}
	policyKeys        = []string{"keep_daily", "keep_last", "keep_monthly", "keep_weekly", "keep_yearly", "max_chain"}
)

func TestRetentionShowJSON(t *testing.T) {
	url := retentionDB(t)
	// An empty catalog: no default, and "vms" is [], never null.
	if got, want := mustRun(t, url, "show", "--json"), `{"default":null,"vms":[]}`+"\n"; got != want {
		t.Errorf("show --json of an empty catalog: %s, want %s", got, want)
	}

	url = retentionDB(t, [3]string{"lab", "u-a", "a"}, [3]string{"lab", "u-b", "b"}, [3]string{"lab2", "u-c", "c"})
	type out struct {
		Default *map[string]int `json:"default"`
		VMs     []struct {
			VM      string          `json:"vm"`
			VMUUID  string          `json:"vm_uuid"`
			Profile string          `json:"profile"`
			Source  string          `json:"source"`
			Policy  *map[string]int `json:"policy"`
		} `json:"vms"`
	}
	parse := func(s string) (out, map[string]json.RawMessage) {
		t.Helper()
		var o out
		var raw map[string]json.RawMessage
		if err := json.Unmarshal([]byte(s), &o); err != nil {
			t.Fatalf("%v: %s", err, s)
		}
		if err := json.Unmarshal([]byte(s), &raw); err != nil {
			t.Fatal(err)
		}
		return o, raw
	}

	// Without a default: every VM's source is none and its policy null.
	o, _ := parse(mustRun(t, url, "show", "--json"))
	if o.Default != nil || len(o.VMs) != 3 {
		t.Fatalf("without policies: %+v", o)
	}
	for _, v := range o.VMs {
		if v.Source != "none" || v.Policy != nil {
			t.Errorf("VM %s without policies: source %q policy %v", v.VM, v.Source, v.Policy)
		}
	}

	mustRun(t, url, "set", "--default", "--keep-daily", "7")
	mustRun(t, url, "set", "a", "--keep-last", "2", "--max-chain", "5")
	s := mustRun(t, url, "show", "--json")
	o, raw := parse(s)
	if got := slices.Sorted(maps.Keys(raw)); !slices.Equal(got, retentionShowKeys) {
		t.Errorf("keys %q, want %q", got, retentionShowKeys)
	}
	var rawVMs []map[string]json.RawMessage
	if err := json.Unmarshal(raw["vms"], &rawVMs); err != nil || len(rawVMs) != 3 {
		t.Fatalf("vms %s: %v", raw["vms"], err)
	}
	for _, v := range rawVMs {
		if got := slices.Sorted(maps.Keys(v)); !slices.Equal(got, retentionVMKeys) {
			t.Errorf("VM keys %q, want %q", got, retentionVMKeys)
		}
		var p map[string]json.RawMessage
		if err := json.Unmarshal(v["policy"], &p); err != nil {
			t.Fatal(err)
		}
		if got := slices.Sorted(maps.Keys(p)); !slices.Equal(got, policyKeys) {
			t.Errorf("policy keys %q, want %q", got, policyKeys)
		}
	}
	if o.Default == nil || (*o.Default)["keep_daily"] != 7 || (*o.Default)["max_chain"] != 30 {
		t.Errorf("default %v, want keep_daily 7 and max_chain 30 (unset: the default bound)", o.Default)
	}
	want := []struct {
		vm, uuid, profile, source string
		keepLast, maxChain        int
	}{{"a", "u-a", "lab", "vm", 2, 5}, {"b", "u-b", "lab", "default", 0, 30}, {"c", "u-c", "lab2", "default", 0, 30}}
	for i, w := range want {
		v := o.VMs[i]
		if v.VM != w.vm || v.VMUUID != w.uuid || v.Profile != w.profile || v.Source != w.source || v.Policy == nil ||
			(*v.Policy)["keep_last"] != w.keepLast || (*v.Policy)["max_chain"] != w.maxChain {
			t.Errorf("VM %d: %+v policy %v, want %+v", i, v, v.Policy, w)
		}
	}

	// With a VM: the same shape, with that VM only.
	o, _ = parse(mustRun(t, url, "show", "b", "--json"))
	if o.Default == nil || len(o.VMs) != 1 || o.VMs[0].VMUUID != "u-b" || o.VMs[0].Source != "default" {
		t.Errorf("show b --json: %+v", o)
	}
	// --profile narrows the list.
	o, _ = parse(mustRun(t, url, "show", "--profile", "lab2", "--json"))
	if len(o.VMs) != 1 || o.VMs[0].VM != "c" {
		t.Errorf("show --profile lab2 --json: %+v", o)
	}
}

func TestRetentionErrors(t *testing.T) {
	// Two VMs named "web", and one VM backed up under two profiles.
	url := retentionDB(t,
		[3]string{"lab", "u-1", "web"}, [3]string{"lab", "u-2", "web"},
		[3]string{"lab", "u-3", "db"}, [3]string{"lab2", "u-3", "db"})
	for _, c := range []struct {
		args  []string
		usage bool // exit 2; else 1
		want  []string
	}{
		{[]string{"set", "nosuch", "--keep-last", "1"}, false, []string{
			`retention set: VM "nosuch" has no restore points in the catalog: a policy is set on a VM cbtflow has backed up, or with --default for all VMs`}},
		{[]string{"set", "web", "--profile", "lab2", "--keep-last", "1"}, false, []string{
			`VM "web" has no restore points under profile lab2 in the catalog`}},
		{[]string{"clear", "nosuch"}, false, []string{`retention clear: VM "nosuch" has no restore points in the catalog`}},
		{[]string{"show", "nosuch"}, false, []string{`retention show: VM "nosuch" has no restore points in the catalog`}},
		{[]string{"set", "web", "--keep-last", "1"}, false, []string{
			`retention set: "web" names 2 VMs in the catalog; give --profile or the instance UUID:`,
			"web  profile lab  uuid u-1", "web  profile lab  uuid u-2"}},
		{[]string{"clear", "db"}, false, []string{
			`retention clear: "db" names 2 VMs in the catalog; it was backed up under several profiles: give --profile:`,
			"db  profile lab   uuid u-3", "db  profile lab2  uuid u-3"}},
		{[]string{"set", "web"}, true, []string{"retention set: a retention policy must keep something: give at least one of --keep-last"}},
		{[]string{"set", "--default", "--max-chain", "10"}, true, []string{"a retention policy must keep something"}},
		{[]string{"set", "u-1", "--keep-last", "2", "--keep-daily", "-1"}, true, []string{"retention set: --keep-daily -1: must be 0 or more"}},
		{[]string{"set", "u-1", "--keep-last", "2", "--max-chain", "-3"}, true, []string{"retention set: --max-chain -3: must be 0 or more"}},
		{[]string{"set", "u-1", "--default", "--keep-last", "1"}, true, []string{"retention set: give a VM or --default, not both"}},
		{[]string{"clear", "u-1", "--default"}, true, []string{"retention clear: give a VM or --default, not both"}},
		{[]string{"set", "--keep-last", "1"}, true, []string{"retention set: give a VM (name or instance UUID) or --default for all VMs"}},
		{[]string{"clear"}, true, []string{"retention clear: give a VM (name or instance UUID) or --default for all VMs"}},
		{[]string{"set", "u-1", "u-2", "--keep-last", "1"}, true, []string{"retention set: give one VM or --default, not 2 arguments"}},
		{[]string{"set", "--default", "--profile", "lab", "--keep-last", "1"}, true, []string{"--profile selects a VM; the default policy has none"}},
		{[]string{"set", "u-1", "--keep-last", "two"}, true, []string{`invalid argument "two" for "--keep-last" flag`}},
		{[]string{"show", "u-1", "u-2"}, true, []string{"retention show: at most one VM, got 2"}},
		// "" would match every VM, as in catalog.FindVMs.
		{[]string{"set", "", "--keep-last", "1"}, true, []string{"retention set: the VM is empty"}},
		{[]string{"clear", ""}, true, []string{"retention clear: the VM is empty"}},
		{[]string{"show", ""}, true, []string{"retention show: the VM is empty"}},
		{[]string{"prune"}, true, []string{`unknown command "prune" for "starter retention"`}},
	} {
		stdout, err := retentionRun(t, url, c.args...)
		name := strings.Join(c.args, " ")
		if err == nil {
			t.Errorf("retention %s: no error; stdout %s", name, stdout)
			continue
		}
		if stdout != "" {
			t.Errorf("retention %s: stdout %q, want nothing", name, stdout)
		}
		if (exitCode(err) == 2) != c.usage {
			t.Errorf("retention %s: %v is a usage error (exit 2): %v, want %v", name, err, !c.usage, c.usage)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("retention %s: error lacks %q:\n%v", name, w, err)
			}
		}
	}
	// Nothing refused was stored.
	if got := mustRun(t, url, "show", "--json"); strings.Contains(got, `"source":"vm"`) || !strings.HasPrefix(got, `{"default":null,`) {
		t.Errorf("a refused command stored a policy: %s", got)
	}
}

// The binary's exit codes: 0 (help included), 1 for a failure, 2 for a
// usage error, as every command's.
func TestRetentionExitCodes(t *testing.T) {
	url := retentionDB(t, [3]string{"lab", "u-1", "web"})
	bin := buildStarter(t)
	for _, c := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"retention", "set", "web", "--keep-last", "1"}, 0, ""},
		{[]string{"retention", "show", "web"}, 0, ""},
		{[]string{"retention", "set", "nosuch", "--keep-last", "1"}, 1, `starter: retention set: VM "nosuch" has no restore points in the catalog`},
		{[]string{"retention", "set", "web"}, 2, "starter: retention set: a retention policy must keep something"},
		{[]string{"retention"}, 2, "Usage:\n  starter retention [command]"},
	} {
		cmd := exec.Command(bin, append(c.args, "--database-url", url)...)
		if len(c.args) == 1 || c.args[len(c.args)-1] == "help" {
			cmd = exec.Command(bin, c.args...)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != c.code || !strings.Contains(stderr.String(), c.stderr) {
			t.Errorf("starter %s: exit %d, stderr:\n%s\nwant exit %d and %q", strings.Join(c.args, " "), code, stderr.String(), c.code, c.stderr)
		}
	}
}

// -h of each subcommand explains the rules and the flags, on stdout.
func TestRetentionHelp(t *testing.T) {
	for _, c := range [][]string{{"retention", "set", "-h"}, {"retention", "show", "--help"}, {"retention", "clear", "-h"}, {"retention", "help"}, {"help", "retention"}} {
		r := runIn(t, c...)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("%v: exit %d, stderr %s", c, r.code, r.stderr)
		}
		want := "starter " + strings.Join(c[:len(c)-1], " ")
		switch {
		case c[0] == "help" || c[len(c)-1] == "help":
			want = "starter retention [command]"
		case c[len(c)-1] == "--help":
			want += ` [VM] [flags]`
		}
		if !strings.Contains(r.stdout, "Usage:\n  "+want) {
			t.Errorf("%v: stdout lacks %q:\n%s", c, want, r.stdout)
		}
	}
	r := runIn(t, "retention", "show", "-h")
	if !strings.Contains(r.stdout, `--json prints one object: {"default": POLICY or null, "vms": [{"vm",`) {
		t.Errorf("retention show -h does not describe the JSON:\n%s", r.stdout)
	}
	r = runIn(t, "retention", "set", "-h")
	if !strings.Contains(r.stdout, "starter retention set (VM | --default)") || !strings.Contains(r.stdout, "keep-daily, -weekly, -monthly and -yearly") {
		t.Errorf("retention set -h does not explain the rules:\n%s", r.stdout)
	}
}
