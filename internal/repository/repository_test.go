package repository

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestPaths(t *testing.T) {
	root := t.TempDir()
	r, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	k := Key{Profile: "lab", VMUUID: "5011d2e3-aaaa-bbbb-cccc-0123456789ab", DiskKey: 204, BackupID: "20261128T203000Z-ab12"}
	p, err := r.PrepareImage(k)
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(root, "lab", "5011d2e3-aaaa-bbbb-cccc-0123456789ab", "204", "20261128T203000Z-ab12.qcow2")
	if p != want {
		t.Errorf("path %s, want %s", p, want)
	}
	if fi, err := os.Stat(filepath.Dir(p)); err != nil || !fi.IsDir() {
		t.Errorf("disk folder not created: %v", err)
	}
	if !r.Contains(p) {
		t.Errorf("%s not inside %s", p, root)
	}
	if r.Contains(filepath.Join(root, "..", "x")) || r.Contains("/etc/passwd") {
		t.Error("outside path reported inside")
	}
}

func TestUnsafeNames(t *testing.T) {
	r, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	bad := []Key{
		{Profile: "../etc", VMUUID: "u", DiskKey: 1, BackupID: "b"},
		{Profile: "lab", VMUUID: "a/b", DiskKey: 1, BackupID: "b"},
		{Profile: "lab", VMUUID: "u", DiskKey: 1, BackupID: ".."},
		{Profile: "lab", VMUUID: "u", DiskKey: 1, BackupID: "x..y"},
		{Profile: "lab", VMUUID: "u", DiskKey: 1, BackupID: "with space"},
		{Profile: "läb", VMUUID: "u", DiskKey: 1, BackupID: "b"},
		{Profile: "", VMUUID: "u", DiskKey: 1, BackupID: "b"},
		{Profile: "lab", VMUUID: "u", DiskKey: -1, BackupID: "b"},
		{Profile: "lab", VMUUID: strings.Repeat("u", 129), DiskKey: 1, BackupID: "b"},
	}
	for _, k := range bad {
		if p, err := r.ImagePath(k); err == nil {
			t.Errorf("%+v accepted as %s", k, p)
		}
	}
	if _, err := Open("relative/root"); err == nil {
		t.Error("relative root accepted")
	}
	if _, err := r.StagingDir("../x"); err == nil {
		t.Error("unsafe staging name accepted")
	}
}

func TestRelResolve(t *testing.T) {
	root := t.TempDir()
	r, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	abs := filepath.Join(root, "lab", "u", "204", "b1.qcow2")
	rel, err := r.Rel(abs)
	if err != nil || rel != filepath.Join("lab", "u", "204", "b1.qcow2") {
		t.Fatalf("Rel(%s) = %q, %v", abs, rel, err)
	}
	if got := r.Resolve(rel); got != abs {
		t.Errorf("Resolve(%q) = %s, want %s", rel, got, abs)
	}
	if got := r.Resolve("/elsewhere/b1.qcow2"); got != "/elsewhere/b1.qcow2" {
		t.Errorf("an absolute path is kept: got %s", got)
	}
	if _, err := r.Rel("/elsewhere/b1.qcow2"); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("Rel of a path outside: %v", err)
	}
	// A moved repository resolves the same relative path under its new root.
	moved, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if got := moved.Resolve(rel); got != filepath.Join(moved.Root(), rel) {
		t.Errorf("moved: %s", got)
	}
}

// TestIsComponent: the hand-written check says what the regular
// expression of a component says, on names built from every kind of
// byte around the limits.
func TestIsComponent(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	pieces := []string{"", "a", "Z", "9", ".", "-", "_", "/", " ", "é", "\x00", "..", "ab", strings.Repeat("x", 126), strings.Repeat("y", 127), strings.Repeat("z", 128)}
	for _, a := range pieces {
		for _, b := range pieces {
			s := a + b
			if got, want := isComponent(s), re.MatchString(s); got != want {
				t.Errorf("isComponent(%q) = %v, want %v", s, got, want)
			}
		}
	}
}
