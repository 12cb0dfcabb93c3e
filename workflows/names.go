// Package workflows holds cbtflow's Temporal workflows: deterministic code
// only — no I/O, no clocks but workflow.Now, no cgo, no govmomi, no pgx.
// Every side effect is an activity of package activities.
//
// Backup is what operators, the Web UI and schedules start with a VM named
// any way ({"vm": "DC0_H0_VM0"}); it resolves the VM and runs BackupVM as a
// child under the VM's canonical workflow ID, so one VM never has two
// backups at once.
package workflows

import (
	"go.temporal.io/sdk/temporal"
)

// TaskQueue is the task queue of cbtflow's workers.
const TaskQueue = "cbtflow"

// QueryProgress is the query that returns a BackupVM's Progress.
const QueryProgress = "progress"

// DefaultProfile is the vCenter profile used when an input names none.
const DefaultProfile = "lab"

// Backup modes an operator can ask for.
const (
	ModeAuto        = "auto"
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// Search attributes (keyword) set by the backup workflows, for filtering in
// the Web UI. They are registered by the set-up (make dev, the compose
// stack). They never hold a secret.
var (
	SearchVM       = temporal.NewSearchAttributeKeyKeyword("CbtflowVM")
	SearchMode     = temporal.NewSearchAttributeKeyKeyword("CbtflowMode")
	SearchVCenter  = temporal.NewSearchAttributeKeyKeyword("CbtflowVCenter")
	SearchBackupID = temporal.NewSearchAttributeKeyKeyword("CbtflowBackupID")
)

// SearchAttributeNames lists the custom search attributes to register, all
// of type Keyword.
var SearchAttributeNames = []string{"CbtflowVM", "CbtflowMode", "CbtflowVCenter", "CbtflowBackupID"}

// BackupWorkflowID is the workflow ID of the backup of one VM: one per VM,
// whatever names it.
func BackupWorkflowID(profile, vmUUID string) string {
	return "backup/" + profile + "/" + vmUUID
}

// Registrar is what a worker registers workflows with (worker.Worker).
type Registrar interface {
	RegisterWorkflow(w interface{})
}

// Register registers every cbtflow workflow.
func Register(r Registrar) {
	r.RegisterWorkflow(Backup)
	r.RegisterWorkflow(BackupVM)
	r.RegisterWorkflow(Sweep)
}
