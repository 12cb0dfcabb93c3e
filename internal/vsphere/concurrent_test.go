package vsphere

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
)

// TestConcurrentTasksOneSession: the worker shares one session per
// vCenter between concurrent activities, so task waits of different VMs
// overlap on it. Each wait must see its own task end: snapshots created
// and removed, CBT switched on, on four VMs at once, each step within a
// deadline (a wait that lost its task's update would hang).
func TestConcurrentTasksOneSession(t *testing.T) {
	f := startLab(t, lab.Options{})
	c := f.client(t)
	vms := []string{"DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"}
	const rounds = 8
	var wg sync.WaitGroup
	errs := make(chan error, len(vms))
	for _, name := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				for i := range rounds {
					ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
					defer cancel()
					vm, err := c.FindVM(ctx, name)
					if err != nil {
						return err
					}
					if err := f.lab.SetCBT(vm.Ref, false); err != nil {
						return err
					}
					if _, err := c.EnableCBT(ctx, vm); err != nil {
						return fmt.Errorf("%s round %d: enable CBT: %w", name, i, err)
					}
					s, err := c.CreateSnapshot(ctx, vm, fmt.Sprintf("cbtflow-concurrent-%d", i))
					if err != nil {
						return fmt.Errorf("%s round %d: create snapshot: %w", name, i, err)
					}
					if err := c.RemoveSnapshot(ctx, vm.Ref, s.Ref); err != nil {
						return fmt.Errorf("%s round %d: remove snapshot: %w", name, i, err)
					}
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}
