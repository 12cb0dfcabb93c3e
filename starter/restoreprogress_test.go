package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/cbtflow/cbtflow/workflows"
)

// The restore's bars follow its phases, never go back (an answer without
// the activity's figures keeps the last ones), and end done, the writing
// with the disk's size (test/restore reads them on a terminal).
func TestRestoreBarView(t *testing.T) {
	var out bytes.Buffer
	v := newRestoreBarView(context.Background(), &out)
	base := workflows.RestoreProgress{BackupID: "b1", VM: "vm1", DiskKey: 204, To: "/r/disk.raw"}
	at := func(phase workflows.RestorePhase, live bool, done, total int64) workflows.RestoreProgress {
		p := base
		p.Phase, p.Live, p.Done, p.Total = phase, live, done, total
		return p
	}
	stage := func(phase workflows.RestorePhase) restoreStage {
		v.mu.Lock()
		defer v.mu.Unlock()
		return *v.stages[phase]
	}
	v.show(at(workflows.RestoreVerifying, true, 100, 1000))
	v.show(at(workflows.RestoreVerifying, false, 0, 0)) // the describe failed
	if st := stage(workflows.RestoreVerifying); st.done != 100 || st.total != 1000 || st.finished {
		t.Errorf("verifying after an answer without figures: %+v, want 100 of 1000", st)
	}
	v.show(at(workflows.RestoreWriting, true, 4<<20, 8<<20))
	if st := stage(workflows.RestoreVerifying); !st.finished {
		t.Errorf("verifying once writing: %+v, want finished", st)
	}
	if st := stage(workflows.RestoreWriting); st.done != 4<<20 || st.finished {
		t.Errorf("writing: %+v, want 4 MiB done", st)
	}
	v.end(true, workflows.RestoreResult{BackupID: "b1", VM: "vm1", DiskKey: 204, To: "/r/disk.raw", Bytes: 8 << 20})
	if st := stage(workflows.RestoreWriting); !st.finished || st.done != 8<<20 {
		t.Errorf("writing at the end: %+v, want finished at 8 MiB", st)
	}
	v.mu.Lock()
	last := v.last
	v.mu.Unlock()
	if last.VM != "vm1" || last.Phase != workflows.RestoreCompleted {
		t.Errorf("the headline at the end: %+v, want the result's VM, completed", last)
	}
}
