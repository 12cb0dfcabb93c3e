package vsphere

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"

	"github.com/cbtflow/cbtflow/lab"
)

// hookRT runs a function once around the first call that match selects:
// before it, or after it.
type hookRT struct {
	next          soap.RoundTripper
	match         func(req soap.HasFault) bool
	before, after func()
	done          bool
}

func (h *hookRT) RoundTrip(ctx context.Context, req, res soap.HasFault) error {
	hit := !h.done && h.match(req)
	if hit {
		h.done = true
		if h.before != nil {
			h.before()
		}
	}
	err := h.next.RoundTrip(ctx, req, res)
	if hit && h.after != nil {
		h.after()
	}
	return err
}

// An earlier attempt's snapshot task that ends while a retry looks at the
// VM's recent tasks gives one snapshot of the name, not two: the retry
// waits for the tasks before it reads the tree.
func TestCreateSnapshotTaskEndsBetweenReads(t *testing.T) {
	const name = "cbtflow-retried"
	ctx, c, vm, task := runningSnapshotTask(t, name)
	c.vim.RoundTripper = &hookRT{
		next: c.vim.RoundTripper,
		match: func(req soap.HasFault) bool {
			b, ok := req.(*methods.RetrievePropertiesExBody)
			if !ok {
				return false
			}
			for _, s := range b.Req.SpecSet {
				for _, p := range s.PropSet {
					if slices.Contains(p.PathSet, "recentTask") {
						return true
					}
				}
			}
			return false
		},
		after: func() { // the first attempt's task ends right after the VM was read
			if _, err := task.WaitForResultEx(ctx); err != nil {
				t.Errorf("first attempt: %v", err)
			}
		},
	}
	s, err := c.CreateSnapshot(ctx, vm, name)
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	all, err := c.Snapshots(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].Ref != s.Ref {
		t.Fatalf("CreateSnapshot returned %s; the VM now has %d snapshots named %q: %+v", s.Ref, len(all), name, all)
	}
}

// A VM deleted right after its snapshot was taken fails the call as a VM
// not found, not as a snapshot gone.
func TestCreatedSnapshotVMGone(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := f.adminSession(t)
	c.vim.RoundTripper = &hookRT{
		next: c.vim.RoundTripper,
		match: func(req soap.HasFault) bool {
			b, ok := req.(*methods.RetrievePropertiesExBody)
			return ok && len(b.Req.SpecSet) == 1 && len(b.Req.SpecSet[0].ObjectSet) == 2 &&
				b.Req.SpecSet[0].ObjectSet[1].Obj.Type == "VirtualMachineSnapshot"
		},
		before: func() {
			v := object.NewVirtualMachine(admin, vmRef(vm.Ref))
			if tk, err := v.PowerOff(ctx); err == nil {
				_ = tk.Wait(ctx)
			}
			tk, err := v.Destroy(ctx)
			if err == nil {
				err = tk.Wait(ctx)
			}
			if err != nil {
				t.Errorf("destroy: %v", err)
			}
		},
	}
	if _, err := c.CreateSnapshot(ctx, vm, "cbtflow-gone"); !errors.Is(err, ErrVMNotFound) {
		t.Errorf("VM deleted after the snapshot was taken: %v, want ErrVMNotFound", err)
	}
}
