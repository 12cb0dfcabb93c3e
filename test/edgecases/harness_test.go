package edgecases

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// vmUnder is one VM of a scenario: its backups, and for each the guest
// data of every disk right before it.
type vmUnder struct {
	s     *stack.Stack
	l     *lab.Lab
	ctx   context.Context
	name  string
	ref   string
	data  string // captures and restores
	taken []taken
}

// taken is one backup and the captures of its disks.
type taken struct {
	label string
	b     stacktest.BackupJSON
	caps  map[int32]string // disk key -> capture of the guest data
}

func newVM(ctx context.Context, t *testing.T, s *stack.Stack, name string) *vmUnder {
	t.Helper()
	info, err := s.Lab().VM(name)
	if err != nil {
		t.Fatal(err)
	}
	return &vmUnder{s: s, l: s.Lab(), ctx: ctx, name: info.Name, ref: info.Ref, data: t.TempDir()}
}

// keys are the VM's disks now, in key order.
func (v *vmUnder) keys(t *testing.T) []int32 {
	t.Helper()
	disks, err := v.l.Disks(v.ref)
	if err != nil {
		t.Fatal(err)
	}
	var keys []int32
	for _, d := range disks {
		keys = append(keys, d.Key)
	}
	slices.Sort(keys)
	return keys
}

// backup captures every disk, runs `starter backup VM --wait --json` and
// checks what every backup must satisfy: it completed with one result per
// disk of the VM, in the mode wanted (key -> mode), with the change ID
// the lab stamped into the backup's snapshot; no cbtflow-* snapshot and no
// qemu-nbd or nbdkit of the backup is left.
func (v *vmUnder) backup(t *testing.T, label string, want map[int32]string) taken {
	t.Helper()
	keys := v.keys(t)
	if len(keys) != len(want) {
		t.Fatalf("%s: the VM has disks %v, the test expects %v", label, keys, want)
	}
	caps := map[int32]string{}
	for _, k := range keys {
		caps[k] = filepath.Join(v.data, fmt.Sprintf("%s-%d.raw", label, k))
		stacktest.Capture(t, v.l, v.ref, k, caps[k])
	}
	// A few seconds each here: a backup that takes minutes hangs.
	bctx, cancel := context.WithTimeout(v.ctx, 2*time.Minute)
	defer cancel()
	res, err := v.s.Starter(bctx, "backup", v.name, "--wait", "--json")
	if err != nil {
		t.Fatalf("%s: backup of %s: %v", label, v.name, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("%s: backup of %s failed: %s", label, v.name, res)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	if b.Status != "completed" || b.BackupID == "" {
		t.Fatalf("%s: backup %+v, want a completed backup", label, b)
	}
	got := make([]int32, 0, len(b.Disks))
	for _, d := range b.Disks {
		got = append(got, d.Key)
	}
	if !slices.Equal(got, keys) {
		t.Errorf("%s: backup %s has disks %v, the VM has %v", label, b.BackupID, got, keys)
	}
	for _, d := range b.Disks {
		if d.Mode != want[d.Key] {
			t.Errorf("%s: disk %d mode %q (note %q), want %q", label, d.Key, d.Mode, d.Note, want[d.Key])
		}
		if logged := stamped(v.l, b.BackupID, d.Key); len(logged) != 1 || logged[0] != d.ChangeID || d.ChangeID == "" {
			t.Errorf("%s: disk %d: change ID %q, the lab stamped %v into the snapshot of %s", label, d.Key, d.ChangeID, logged, b.BackupID)
		}
		if _, err := os.Stat(d.Path); err != nil {
			t.Errorf("%s: disk %d: %v", label, d.Key, err)
			continue
		}
		// A full image stands alone; an incremental one is an overlay on
		// the image of the same disk in the backup before.
		chain := chainFiles(imageChain(v.ctx, t, d.Path))
		var want []string
		switch d.Mode {
		case full:
			want = []string{filepath.Clean(d.Path)}
		case incr:
			want = []string{filepath.Clean(d.Path), filepath.Clean(v.lastPath(d.Key))}
		}
		if len(chain) < len(want) || !slices.Equal(chain[:len(want)], want) || (d.Mode == full && len(chain) != 1) {
			t.Errorf("%s: disk %d (%s): image chain %v, want it to start with %v", label, d.Key, d.Mode, chain, want)
		}
	}
	snaps, err := stacktest.Snapshots(v.ctx, v.l, v.ref)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) > 0 {
		t.Errorf("%s: snapshots left on %s: %v", label, v.name, snaps)
	}
	if left := procsOf(v.l, v.ref, b.BackupID); len(left) > 0 {
		t.Errorf("%s: processes of backup %s left: %v", label, b.BackupID, left)
	}
	tk := taken{label: label, b: b, caps: caps}
	v.taken = append(v.taken, tk)
	return tk
}

// lastPath is the image of disk key in the latest backup taken that has
// the disk, "" when none has.
func (v *vmUnder) lastPath(key int32) string {
	for i := len(v.taken) - 1; i >= 0; i-- {
		for _, d := range v.taken[i].b.Disks {
			if d.Key == key {
				return d.Path
			}
		}
	}
	return ""
}

// restoreAll restores every disk of every backup taken and compares it
// byte for byte (size included) with the guest data captured right before
// that backup.
func (v *vmUnder) restoreAll(t *testing.T) {
	t.Helper()
	for _, tk := range v.taken {
		for _, d := range tk.b.Disks {
			v.restoreCompare(t, tk, d.Key)
		}
	}
}

func (v *vmUnder) restoreCompare(t *testing.T, tk taken, key int32) {
	t.Helper()
	out := filepath.Join(v.data, fmt.Sprintf("restore-%s-%d.raw", tk.label, key))
	res, err := v.s.Starter(v.ctx, "restore", tk.b.BackupID, "--disk", fmt.Sprint(key), "--to", out)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Errorf("restore of %s (%s) disk %d: %s", tk.label, tk.b.BackupID, key, res)
		return
	}
	defer os.Remove(out)
	diff, err := stacktest.SameContent(tk.caps[key], out)
	if err != nil {
		t.Fatal(err)
	}
	if diff != "" {
		t.Errorf("restore of %s (%s) disk %d differs from the disk at backup time: %s", tk.label, tk.b.BackupID, key, diff)
	}
}

// checkCatalog checks `starter list VM --json`: every backup taken is
// there, committed, with the disks, modes, paths and change IDs the backup
// reported, and every change ID is the one the lab stamped.
func (v *vmUnder) checkCatalog(t *testing.T) []stacktest.ListJSON {
	t.Helper()
	res, err := v.s.Starter(v.ctx, "list", v.name, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list %s: %v %s", v.name, err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != len(v.taken) {
		t.Errorf("list %s: %d backups, want %d:\n%s", v.name, len(list), len(v.taken), res.Stdout)
	}
	byID := map[string]stacktest.ListJSON{}
	for _, e := range list {
		byID[e.BackupID] = e
		for _, d := range e.Disks {
			if logged := stamped(v.l, e.BackupID, d.Key); len(logged) != 1 || logged[0] != d.ChangeID {
				t.Errorf("catalog: %s disk %d has change ID %q, the lab stamped %v", e.BackupID, d.Key, d.ChangeID, logged)
			}
		}
	}
	for _, tk := range v.taken {
		e, ok := byID[tk.b.BackupID]
		if !ok {
			t.Errorf("list %s: backup %s (%s) missing", v.name, tk.b.BackupID, tk.label)
			continue
		}
		if e.Status != "committed" || len(e.Disks) != len(tk.b.Disks) {
			t.Errorf("list: %s (%s) is %s with %d disks, want committed with %d", e.BackupID, tk.label, e.Status, len(e.Disks), len(tk.b.Disks))
		}
		for _, d := range e.Disks {
			want := tk.b.Disk(t, d.Key)
			if d.ChangeID != want.ChangeID || d.Path != want.Path || d.Mode != want.Mode {
				t.Errorf("list: %s disk %d: %s %s %s, the backup said %s %s %s", e.BackupID, d.Key, d.Mode, d.ChangeID, d.Path, want.Mode, want.ChangeID, want.Path)
			}
		}
	}
	return list
}

// all gives every key the same mode.
func all(keys []int32, mode string) map[int32]string {
	m := map[int32]string{}
	for _, k := range keys {
		m[k] = mode
	}
	return m
}
