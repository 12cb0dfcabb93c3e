package activities_test

import (
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// RestoreDisk writes a restore point's disk on the worker's machine, equal
// to its chain; what no retry mends (an existing file, a relative path, an
// unknown point or disk, a damaged image) fails non-retryably, naming it,
// and leaves no file.
func TestRestoreDisk(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d := c.image(t, "b1", 2000, nil)
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 4M", "-c", "write -P 0xcd 40M 2M", d.Path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	d.SizeBytes, d.SHA256 = fileSum(t, d.Path)
	if err := c.commit(t, "b1", d); err != nil {
		t.Fatal(err)
	}
	r := &activities.Restorer{Catalog: c.cat, Repo: c.repo}
	env := newActivityEnv(t, slog.New(slog.NewTextHandler(t.Output(), nil)), r)

	found := mustExecute[activities.FindRestorePointResult](t, env, r.FindRestorePoint, activities.FindRestorePointInput{BackupID: "b1", DiskKey: 2000})
	if found.VM != "DC0_H0_VM0" || found.VMUUID != catVMUUID || found.Capacity != catCapacity {
		t.Errorf("FindRestorePoint: %+v", found)
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "disk.raw")
	res := mustExecute[activities.RestoreDiskResult](t, env, r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: out})
	if res.Bytes != catCapacity || len(res.Chain) != 1 || res.To != out {
		t.Errorf("RestoreDisk: %+v", res)
	}
	if diff, err := qemu.Compare(ctxT(t, time.Minute), out, "raw", d.Path, "qcow2"); err != nil || diff != "" {
		t.Errorf("the restored file differs from the image: %q %v", diff, err)
	}
	before, _ := os.ReadDir(dir)

	for _, c := range []struct {
		fn      any
		in      any
		typ     string
		mention []string
	}{
		{r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: out}, activities.ErrTypeRestoreRefused, []string{out, "exists", "--force"}},
		{r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: dir}, activities.ErrTypeRestoreRefused, []string{dir, "is a directory"}},
		{r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: "disk.raw"}, activities.ErrTypeRestoreRefused, []string{`"disk.raw" is not an absolute path`}},
		{r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: filepath.Join(dir, "x.raw"), Format: "vmdk"}, activities.ErrTypeRestoreRefused, []string{`format "vmdk"`}},
		{r.RestoreDisk, activities.RestoreDiskInput{BackupID: "nope", DiskKey: 2000, To: filepath.Join(dir, "x.raw")}, activities.ErrTypeNoRestorePoint, []string{"backup nope does not exist"}},
		{r.FindRestorePoint, activities.FindRestorePointInput{BackupID: "nope", DiskKey: 2000}, activities.ErrTypeNoRestorePoint, []string{"backup nope does not exist"}},
		{r.FindRestorePoint, activities.FindRestorePointInput{BackupID: "b1", DiskKey: 99}, activities.ErrTypeNoRestorePoint, []string{"backup b1 has no disk 99"}},
	} {
		_, err := env.ExecuteActivity(c.fn, c.in)
		wantAppError(t, err, c.typ, c.mention...)
	}

	// A damaged image is refused by name.
	f, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, d.SizeBytes-100); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{b[0] ^ 0xff}, d.SizeBytes-100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, err = env.ExecuteActivity(r.RestoreDisk, activities.RestoreDiskInput{BackupID: "b1", DiskKey: 2000, To: filepath.Join(dir, "x.raw")})
	wantAppError(t, err, activities.ErrTypeRestorePointDamaged, d.Path, "SHA-256")
	if after, _ := os.ReadDir(dir); len(after) != len(before) {
		t.Errorf("refused restores left files: %v, was %v", after, before)
	}
}
