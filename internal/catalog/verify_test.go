package catalog

import (
	"context"
	"testing"
)

func TestVerifications(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	vm := Backup{ID: "v1", Profile: "lab", VMUUID: "uuid-v", VMName: "vm-v", Mode: "auto"}
	if err := c.Begin(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "v1", []Disk{disk(204, ModeFull, "c/1", ""), disk(205, ModeFull, "c/2", "")}); err != nil {
		t.Fatal(err)
	}
	if vs, err := c.Verifications(ctx); err != nil || len(vs) != 0 {
		t.Fatalf("before any: %v %v", vs, err)
	}
	// Disk 205 found damaged, then both verified sound: the newest of
	// each disk counts.
	for _, r := range []struct {
		key     int32
		ok      bool
		problem string
	}{{204, true, ""}, {205, false, "v1.qcow2 at offset 4194304: block differs"}} {
		if err := c.RecordVerification(ctx, "v1", r.key, r.ok, r.problem); err != nil {
			t.Fatal(err)
		}
	}
	vs, err := c.Verifications(ctx)
	if v := vs["v1"]; err != nil || v.OK || v.Problem != "v1.qcow2 at offset 4194304: block differs" || v.At.IsZero() {
		t.Fatalf("after a damaged disk: %+v %v", vs, err)
	}
	if err := c.RecordVerification(ctx, "v1", 205, true, ""); err != nil {
		t.Fatal(err)
	}
	if vs, err = c.Verifications(ctx); err != nil || !vs["v1"].OK || vs["v1"].Problem != "" {
		t.Fatalf("after both sound: %+v %v", vs, err)
	}
	if err := c.RecordVerification(ctx, "nope", 204, true, ""); err == nil {
		t.Error("a verification of an unknown restore point was recorded")
	}
}

// A VM's newest verification is that of the point verified last; a VM
// without one is not listed.
func TestNewestVerifications(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	for _, b := range []Backup{
		{ID: "a1", Profile: "lab", VMUUID: "uuid-a", VMName: "vm-a", Mode: "auto"},
		{ID: "a2", Profile: "lab", VMUUID: "uuid-a", VMName: "vm-a", Mode: "auto"},
		{ID: "b1", Profile: "lab", VMUUID: "uuid-b", VMName: "vm-b", Mode: "auto"},
	} {
		if err := c.Begin(ctx, b); err != nil {
			t.Fatal(err)
		}
		if err := c.Commit(ctx, b.ID, []Disk{disk(204, ModeFull, "c/"+b.ID, "")}); err != nil {
			t.Fatal(err)
		}
	}
	if vs, err := c.NewestVerifications(ctx); err != nil || len(vs) != 0 {
		t.Fatalf("before any: %+v %v", vs, err)
	}
	verify := func(id string, ok bool, problem string) {
		t.Helper()
		if err := c.RecordVerification(ctx, id, 204, ok, problem); err != nil {
			t.Fatal(err)
		}
	}
	verify("a1", true, "")
	verify("a2", false, "a2.qcow2: truncated")
	vs, err := c.NewestVerifications(ctx)
	if err != nil || len(vs) != 1 || vs[0].Name != "vm-a" || vs[0].UUID != "uuid-a" || vs[0].Profile != "lab" ||
		vs[0].BackupID != "a2" || vs[0].OK || vs[0].Problem != "a2.qcow2: truncated" || vs[0].At.IsZero() {
		t.Fatalf("after a sound a1 and a damaged a2: %+v %v", vs, err)
	}
	verify("a1", true, "")
	verify("b1", true, "")
	vs, err = c.NewestVerifications(ctx)
	if err != nil || len(vs) != 2 || vs[0].BackupID != "a1" || !vs[0].OK || vs[1].Name != "vm-b" || vs[1].BackupID != "b1" || !vs[1].OK {
		t.Fatalf("after a1 verified again, and b1: %+v %v", vs, err)
	}
}
