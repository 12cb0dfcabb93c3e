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
