// Package workflows holds cbtflow's Temporal workflows: deterministic code
// only — no I/O, no clocks but workflow.Now, no cgo, no govmomi, no pgx.
// Every side effect is an activity of package activities.
//
// Backup is what operators, the Web UI and schedules start with a VM named
// any way ({"vm": "DC0_H0_VM0"}); it resolves the VM and runs BackupVM
// under the VM's canonical workflow ID (BackupWorkflowID: the vCenter's
// and the VM's instance UUIDs, not the profile's name), so one VM never
// has two backups at once: as a child when it waits for it, through the
// client (a local activity) when it is started detached.
package workflows

import (
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
)

// TaskQueue is the task queue of cbtflow's workers.
const TaskQueue = "cbtflow"

// QueryProgress is the query that returns a BackupVM's Progress.
const QueryProgress = "progress"

// Backup modes an operator can ask for. Full and incremental are also the
// modes of each disk, defined once by the catalog that records them.
const (
	ModeAuto        = "auto"
	ModeFull        = activities.ModeFull
	ModeIncremental = activities.ModeIncremental
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
// whatever names it and under whatever profile, because it is made of
// identities vCenter keeps: the vCenter's instance UUID
// (activities.ResolveVMResult.VCenterUUID) and the VM's. Two profiles of
// one vCenter (two users, two URLs) thus share it, and Temporal refuses a
// second backup of the VM while one runs under either.
func BackupWorkflowID(vcenterUUID, vmUUID string) string {
	return "backup/" + vcenterUUID + "/" + vmUUID
}

// ProfileBackupWorkflowID is the per-VM workflow ID before the vCenter's
// identity was known, backup/<profile>/<vm uuid>: one per VM and profile.
// Backup runs recorded before that change keep it on replay, and it is
// still the ID when the server reports no instance UUID (a standalone ESXi
// host), where the profile is the best name of the server there is.
func ProfileBackupWorkflowID(profile, vmUUID string) string {
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
	r.RegisterWorkflow(Prune)
	r.RegisterWorkflow(PruneVM)
	r.RegisterWorkflow(LookupVM)
	r.RegisterWorkflow(Verify)
	r.RegisterWorkflow(Restore)
	r.RegisterWorkflow(RestoreVM)
	r.RegisterWorkflow(Export)
}
