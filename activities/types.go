package activities

import (
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/retention"
)

// DefaultMaxChain is the chain bound of a VM whose retention policy sets
// none (or that has no policy): the retention package's.
const DefaultMaxChain = retention.DefaultMaxChain

// Types of non-retryable ApplicationErrors returned by the activities.
const (
	ErrTypeProfileNotFound = "ProfileNotFound"
	ErrTypeVMNotFound      = "VMNotFound"
	ErrTypeLogin           = "LoginFailed"
	ErrTypeUnreachable     = "VCenterUnreachable" // retryable: a vCenter may come back
	ErrTypeCertificate     = "CertificateMismatch"
	ErrTypeAmbiguousVM     = "AmbiguousVM"
	ErrTypeNoDisks         = "NoDisks"
	// ErrTypeCBTReset: the first query with a stored change ID was refused
	// (InvalidArgument or FileFault): the disk needs a full backup.
	ErrTypeCBTReset = "CBTReset"
	// ErrTypeCBTQuery: a CBT query failed and no reset explains it: a
	// fault later in the paging, a fault on "*", or any other fault (e.g.
	// the SystemError of a vCenter that failed internally). The backup
	// fails; it does not fall back to a full backup.
	ErrTypeCBTQuery       = "CBTQueryFailed"
	ErrTypeNoSpace        = "NoSpace"
	ErrTypeReadOnly       = "ReadOnlyRepository"
	ErrTypePermission     = "PermissionDenied"
	ErrTypeInvalidInput   = "InvalidInput"
	ErrTypeNoRestorePoint = "NoRestorePoint"
	ErrTypeCommitted      = "AlreadyCommitted"
	ErrTypeBackupFailed   = "BackupAlreadyFailed"
	ErrTypeSnapshotGone   = "SnapshotGone"
	// ErrTypeCatalogUnusable: the catalog database does not exist or lacks
	// cbtflow's tables. A database that is down is retried instead.
	ErrTypeCatalogUnusable = "CatalogUnusable"
	// ErrTypeRepositoryUnavailable: a disk's folder of restore points is
	// missing (an unmounted or misconfigured repository).
	ErrTypeRepositoryUnavailable = "RepositoryUnavailable"
	// ErrTypeSnapshotIdentity: the backup's snapshot moref names another
	// snapshot now (renamed, or reissued after a vCenter restart): nothing
	// is read from, committed for or removed under that moref.
	ErrTypeSnapshotIdentity = "SnapshotIdentity"
	// ErrTypeImageCorrupt: a disk's image fails qemu-img check after the
	// copy. Non-retryable when the attempt copied it from scratch (the
	// repository's storage, or qemu, damaged it: a new copy would not fare
	// better); retryable when it was resumed from an earlier attempt, whose
	// partial image is then removed, so the retry starts afresh.
	ErrTypeImageCorrupt = "ImageCorrupt"
	// ErrTypeBackupRunning: a prune found a backup of its VM running (one
	// started under another form of the per-VM workflow ID): it leaves
	// the VM alone; the next prune tries again.
	ErrTypeBackupRunning = "BackupRunning"
	// ErrTypeRestoreIntoVMRunning: BeginBackup found a restore into the
	// VM that has not ended (catalog.UnfinishedVMRestores; the sweeper
	// ends one whose workflow is gone): the backup is refused before the
	// catalog records it.
	ErrTypeRestoreIntoVMRunning = "RestoreIntoVMRunning"
	// ErrTypeRepositoryFull: the repository has less free space than the
	// backup needs (CheckSpace): it fails before the snapshot, or after
	// the CBT query when the exact changed bytes do not fit, before any
	// image is written.
	ErrTypeRepositoryFull = "RepositoryFull"
)

// The modes of one disk's backup, as the catalog records them.
const (
	ModeFull        = catalog.ModeFull
	ModeIncremental = catalog.ModeIncremental
)

// ResolveVMInput names a VM: by name, inventory path or moref.
type ResolveVMInput struct {
	// Profile is the vCenter profile; empty: the worker's default
	// (CBTFLOW_PROFILE, or the only profile configured).
	Profile string `json:"profile"`
	VM      string `json:"vm"`
}

// ResolveVMResult identifies the VM for good.
type ResolveVMResult struct {
	// Profile is the profile the VM was found under: the input's, or the
	// worker's default when the input named none. The backup uses it from
	// then on.
	Profile string `json:"profile"`
	VMRef   string `json:"vm_ref"`
	VMUUID  string `json:"vm_uuid"`
	VMName  string `json:"vm_name"`
	// VCenterUUID is the instance UUID of the vCenter the profile reaches
	// (the same under every profile of that vCenter); empty when the
	// server has none (a standalone ESXi host), and in results recorded
	// before it existed.
	VCenterUUID string `json:"vcenter_uuid,omitempty"`
}

// PrepareVMInput asks for a VM's disks, by instance UUID.
type PrepareVMInput struct {
	Profile string `json:"profile"`
	VMUUID  string `json:"vm_uuid"`
	// SkipAllocation leaves the disks' AllocatedBytes out (0): the backup
	// asks for them (AllocatedBytes) only for the disks it backs up full,
	// so that an incremental backup makes neither RefreshStorageInfo nor
	// the read of the VM's file layout.
	SkipAllocation bool `json:"skip_allocation,omitempty"`
}

// AllocatedBytesInput names the disks of a VM (PrepareVM's) whose
// allocation a backup needs: those it backs up full.
type AllocatedBytesInput struct {
	Profile string `json:"profile"`
	VMRef   string `json:"vm_ref"`
	VMName  string `json:"vm_name,omitempty"` // for messages
	// Disks are the disks' keys and capacities (each value is clipped to
	// its disk's capacity).
	Disks []AllocationDisk `json:"disks"`
}

// AllocationDisk is one disk of AllocatedBytesInput, and of its result
// with its allocation.
type AllocationDisk struct {
	Key      int32 `json:"key"`
	Capacity int64 `json:"capacity"`
	// AllocatedBytes and AllocatedUnknown are as in VMDisk (results only).
	AllocatedBytes   int64 `json:"allocated_bytes,omitempty"`
	AllocatedUnknown bool  `json:"allocated_unknown,omitempty"`
}

// AllocatedBytesResult is every disk of the input with its allocation.
type AllocatedBytesResult struct {
	Disks []AllocationDisk `json:"disks"`
}

// VMDisk is one disk of the live VM.
type VMDisk struct {
	Key      int32  `json:"key"`
	Label    string `json:"label,omitempty"`
	Capacity int64  `json:"capacity"`
	FileName string `json:"file_name"`
	// AllocatedBytes is what the disk's files hold on the datastore (its
	// extents' sizes in the VM's file layout, at most Capacity): what a
	// full backup of it writes, about. When the layout does not know the
	// disk, it is Capacity and AllocatedUnknown is set. Zero in results
	// recorded before it existed.
	AllocatedBytes   int64 `json:"allocated_bytes,omitempty"`
	AllocatedUnknown bool  `json:"allocated_unknown,omitempty"`
}

// PrepareVMResult describes the VM and whether CBT had to be enabled (then
// every disk needs a full backup: earlier change IDs mean nothing).
type PrepareVMResult struct {
	VMRef          string   `json:"vm_ref"`
	VMName         string   `json:"vm_name"`
	Disks          []VMDisk `json:"disks"`
	CBTJustEnabled bool     `json:"cbt_just_enabled,omitempty"`
}

// BeginBackupInput records a running backup in the catalog.
type BeginBackupInput struct {
	BackupID   string `json:"backup_id"`
	Profile    string `json:"profile"`
	VMUUID     string `json:"vm_uuid"`
	VMName     string `json:"vm_name"`
	Mode       string `json:"mode"`
	WorkflowID string `json:"workflow_id"`
	RunID      string `json:"run_id"`
	// DiskKeys are the VM's disks now: the chain of a disk no longer among
	// them is closed.
	DiskKeys []int32 `json:"disk_keys,omitempty"`
}

// PreviousDisk is a disk's latest committed restore point.
type PreviousDisk struct {
	Key         int32  `json:"key"`
	BackupID    string `json:"backup_id"`
	Capacity    int64  `json:"capacity"`
	ChangeID    string `json:"change_id"`
	Path        string `json:"path"`
	ChainLength int    `json:"chain_length"` // images in its chain, itself included
	// Damaged says why the chain cannot be built on ("" when it was
	// verified): the disk then gets a full backup.
	Damaged string `json:"damaged,omitempty"`
	// RecentChangedBytes is the largest changed bytes of the incrementals
	// in the disk's chain (its recent incrementals, at most max-chain of
	// them); RecentIncrementals how many there are (0: none yet, the
	// chain is a full alone). The space check before the snapshot
	// estimates an incremental's size from it.
	RecentChangedBytes int64 `json:"recent_changed_bytes,omitempty"`
	RecentIncrementals int   `json:"recent_incrementals,omitempty"`
	// RestoredSince says why the disk's CBT history no longer matches its
	// chain: a restore into the VM began after this restore point (""
	// when none did). The disk then gets a full backup.
	RestoredSince string `json:"restored_since,omitempty"`
}

// BeginBackupResult lists the previous restore point of each disk.
type BeginBackupResult struct {
	Previous []PreviousDisk `json:"previous,omitempty"`
	// ClosedChains are disks that left the VM since their last restore
	// point; their chains are closed now.
	ClosedChains []int32 `json:"closed_chains,omitempty"`
	// Warnings name damaged chains found, and the restore points marked.
	Warnings []string `json:"warnings,omitempty"`
	// MaxChain is the VM's retention policy's chain bound (max-chain):
	// a disk whose chain holds that many images gets a full backup.
	MaxChain int `json:"max_chain,omitempty"`
}

// CreateSnapshotInput asks for the backup's snapshot.
type CreateSnapshotInput struct {
	Profile  string `json:"profile"`
	VMRef    string `json:"vm_ref"`
	VMUUID   string `json:"vm_uuid"`
	BackupID string `json:"backup_id"`
}

// SnapshotDisk is a disk as the snapshot's config describes it: the change
// ID there is the one the next backup queries from.
type SnapshotDisk struct {
	Key      int32  `json:"key"`
	Capacity int64  `json:"capacity"`
	FileName string `json:"file_name"`
	ChangeID string `json:"change_id"`
}

// CreateSnapshotResult is the snapshot taken.
type CreateSnapshotResult struct {
	SnapshotRef  string         `json:"snapshot_ref"`
	SnapshotName string         `json:"snapshot_name"`
	Disks        []SnapshotDisk `json:"disks"`
}

// ChangedAreasInput asks CBT which areas of a disk changed since ChangeID
// ("*" for the allocated areas, for a full backup).
type ChangedAreasInput struct {
	Profile     string `json:"profile"`
	VMRef       string `json:"vm_ref"`
	SnapshotRef string `json:"snapshot_ref"`
	BackupID    string `json:"backup_id"`
	Key         int32  `json:"key"`
	Capacity    int64  `json:"capacity"`
	ChangeID    string `json:"change_id"`
}

// ChangedAreasResult says how much changed; the extents themselves are in
// ExtentsFile (JSON), since a big disk's list may be larger than a payload
// should be.
type ChangedAreasResult struct {
	ExtentsFile  string `json:"extents_file"`
	Extents      int    `json:"extents"`
	ChangedBytes int64  `json:"changed_bytes"`
}

// TransferDiskInput copies a disk's changed areas from the snapshot into a
// new QCOW2: a fresh image (full) or an overlay on BackingPath.
type TransferDiskInput struct {
	Profile      string `json:"profile"`
	VMRef        string `json:"vm_ref"`
	VMUUID       string `json:"vm_uuid"`
	SnapshotRef  string `json:"snapshot_ref"`
	BackupID     string `json:"backup_id"`
	Key          int32  `json:"key"`
	Capacity     int64  `json:"capacity"`
	FileName     string `json:"file_name"`
	Mode         string `json:"mode"` // full or incremental
	BackingPath  string `json:"backing_path,omitempty"`
	ExtentsFile  string `json:"extents_file"`
	ChangedBytes int64  `json:"changed_bytes"`
}

// TransferDiskResult is the durable QCOW2 of one disk.
type TransferDiskResult struct {
	Path         string `json:"path"`
	ReadBytes    int64  `json:"read_bytes"`
	WrittenBytes int64  `json:"written_bytes"` // data and zeroes written
	SizeBytes    int64  `json:"size_bytes"`    // the QCOW2 file's size
	// AllocatedBytes is the space the file takes when it is proven (its
	// blocks): less than its size, since an image is sparse.
	AllocatedBytes int64   `json:"allocated_bytes,omitempty"`
	SHA256         string  `json:"sha256"`
	Seconds        float64 `json:"seconds"`
	// Stamp is the image file's identity while SHA256 was computed: the
	// commit records it only if the file still has it.
	Stamp *FileStamp `json:"stamp,omitempty"`
	// DigestSHA256 and DigestSize are the hex SHA-256 and size of the
	// image's digest file (Path + ".digests", package internal/digest),
	// written and synced before the result; empty when the transfer
	// wrote none (Transfer.Digests off, or a worker before digests).
	DigestSHA256 string `json:"digest_sha256,omitempty"`
	DigestSize   int64  `json:"digest_size,omitempty"`
	// SetupSeconds, CopySeconds, CheckSeconds and HashSeconds split
	// Seconds into the attempt's steps (make bench's end-to-end table
	// reads them from the workflow history): everything before the copy
	// (slot, image creation, the snapshot check), the copy (the NBD
	// servers started, the copier with its final flush, the servers
	// stopped; a sync of the new image when nothing is to be copied),
	// the image's check (internal/qcow2.Check), and its seal (or
	// SHA-256) — the last two run at the same time, so their times
	// overlap. The rest of Seconds
	// is the digest file's end and the snapshot check after the copy.
	// Zero in results of workers before them.
	SetupSeconds float64 `json:"setup_seconds,omitempty"`
	CopySeconds  float64 `json:"copy_seconds,omitempty"`
	CheckSeconds float64 `json:"check_seconds,omitempty"`
	HashSeconds  float64 `json:"hash_seconds,omitempty"`
	// Writer is what wrote the image's data in the attempt that ended
	// it (an attempt resumed an earlier one's image, which another may
	// have written): WriterCopier (the copier, in process) or
	// WriterQemuNBD; empty when nothing was copied, and in results of
	// workers before it.
	Writer string `json:"writer,omitempty"`
}

// What wrote a transfer's image (TransferDiskResult.Writer).
const (
	WriterCopier  = "copier"
	WriterQemuNBD = "qemu-nbd"
)

// FileStamp identifies a file's content cheaply (inode, mtime and ctime
// in nanoseconds): any write changes it.
type FileStamp struct {
	Inode   int64 `json:"inode"`
	MtimeNs int64 `json:"mtime_ns"`
	CtimeNs int64 `json:"ctime_ns"`
}

// TransferDisksInput is the transfers of a backup's disks, in one
// activity (TransferDisks).
type TransferDisksInput struct {
	Disks []TransferDiskInput `json:"disks"`
	// MaxParallel is how many of them copy at once (less than 1: one);
	// the worker's transfer slots bound them too.
	MaxParallel int `json:"max_parallel"`
}

// TransferDisksResult is every disk's durable QCOW2, in the order of
// TransferDisksInput.Disks.
type TransferDisksResult struct {
	Disks []TransferDiskResult `json:"disks"`
}

// TransferDisksProgress is the heartbeat detail of TransferDisks: each
// running disk's latest TransferProgress (its resume point, what the
// progress query reports), and the result of each disk done, which a
// retry keeps instead of copying the disk again.
type TransferDisksProgress struct {
	Disks []TransferProgress `json:"disks"`
	Done  []TransferDiskDone `json:"done,omitempty"`
}

// TransferDiskDone is a disk of TransferDisks that is done.
type TransferDiskDone struct {
	Key    int32              `json:"key"`
	Result TransferDiskResult `json:"result"`
}

// TransferProgress is the heartbeat detail of TransferDisk: the resume
// point of a retry (it advances only after a FLUSH of the target), and
// what the workflow's progress query reports of a running transfer (the
// server keeps the latest details of a pending activity, so progress
// costs no workflow history).
type TransferProgress struct {
	Path        string `json:"path"`
	ResumePoint int64  `json:"resume_point"`
	// Done and Total are the bytes copied and to copy.
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
	// Key is the disk's; Stage one of the TransferStage* values.
	Key   int32  `json:"key,omitempty"`
	Stage string `json:"stage,omitempty"`
	// Rate is the copy's (or the verification's) recent speed, bytes per
	// second; 0 while unknown.
	Rate float64 `json:"rate,omitempty"`
	// Verified and VerifyTotal are the bytes of the image read back (its
	// SHA-256) and its size, in StageVerifying.
	Verified    int64 `json:"verified,omitempty"`
	VerifyTotal int64 `json:"verify_total,omitempty"`
}

// The stages of a transfer, in its heartbeat details.
const (
	TransferStageWaiting   = "waiting"   // for a transfer slot of the worker
	TransferStageCopying   = "copying"   // the changed areas, from the snapshot into the image
	TransferStageVerifying = "verifying" // the image's check and its seal (or SHA-256)
	// TransferStageDone: the image is durable and proven; the other
	// disks of the same TransferDisks still run (progress readers make
	// it from TransferDisksProgress.Done).
	TransferStageDone = "done"
)

// CommitDisk is one disk of a restore point to commit.
type CommitDisk struct {
	Key             int32  `json:"key"`
	Capacity        int64  `json:"capacity"`
	Mode            string `json:"mode"`
	Path            string `json:"path"`
	BackingBackupID string `json:"backing_backup_id,omitempty"`
	ChangeIDFrom    string `json:"change_id_from,omitempty"`
	ChangeID        string `json:"change_id"`
	ChangedBytes    int64  `json:"changed_bytes"`
	WrittenBytes    int64  `json:"written_bytes"`
	SizeBytes       int64  `json:"size_bytes"`
	SHA256          string `json:"sha256"`
	Note            string `json:"note,omitempty"`
	// Stamp is the transfer's (TransferDiskResult.Stamp); nil in
	// workflows started before it existed.
	Stamp *FileStamp `json:"stamp,omitempty"`
	// DigestSHA256 and DigestSize are the transfer's
	// (TransferDiskResult.DigestSHA256, DigestSize): the commit records
	// the digest file beside the image only if it still has them. Empty
	// in workflows that do not pass them: the commit then records the
	// digest file it finds complete beside the image, if any.
	DigestSHA256 string `json:"digest_sha256,omitempty"`
	DigestSize   int64  `json:"digest_size,omitempty"`
}

// CommitInput makes a backup a restore point.
type CommitInput struct {
	BackupID string       `json:"backup_id"`
	Disks    []CommitDisk `json:"disks"`
}

// SnapshotPrefix starts the name of every snapshot cbtflow takes:
// "cbtflow-<backup id>".
const SnapshotPrefix = "cbtflow-"

// RemoveSnapshotInput removes the backup's snapshot: by moref, or by name
// when the moref is unknown (the snapshot activity died after creating it).
type RemoveSnapshotInput struct {
	Profile      string `json:"profile"`
	VMRef        string `json:"vm_ref"`
	SnapshotRef  string `json:"snapshot_ref,omitempty"`
	SnapshotName string `json:"snapshot_name"`
}

// The bases of a SpaceDisk's bytes: how a disk's need was learned.
const (
	SpaceAllocated = "allocated" // a full: the disk's allocated bytes (AllocatedBytes)
	SpaceCapacity  = "capacity"  // a full whose allocation is unknown: its capacity
	SpaceEstimated = "estimated" // an incremental before its CBT query: the most its recent incrementals changed
	SpaceChanged   = "changed"   // after the CBT query: the exact changed (or, for a full, allocated) bytes
)

// SpaceDisk is what one disk's backup will write into the repository.
type SpaceDisk struct {
	Key   int32  `json:"key"`
	Mode  string `json:"mode"` // full or incremental
	Bytes int64  `json:"bytes"`
	Basis string `json:"basis"` // one of the Space* bases
	// Incrementals is how many recent incrementals an estimate is drawn
	// from (Basis SpaceEstimated).
	Incrementals int `json:"incrementals,omitempty"`
}

// CheckSpaceInput asks whether the repository has room for a backup:
// every disk's bytes plus the margin (SpaceMargin).
type CheckSpaceInput struct {
	BackupID string      `json:"backup_id"`
	VMName   string      `json:"vm"`
	Disks    []SpaceDisk `json:"disks"`
	// AfterQuery: the bytes are CBT's exact answer (the check after the
	// snapshot); otherwise the check before it.
	AfterQuery bool `json:"after_query,omitempty"`
}

// CheckSpaceResult is the repository's room and the backup's need.
type CheckSpaceResult struct {
	Repository  string `json:"repository"`
	FreeBytes   int64  `json:"free_bytes"`
	NeededBytes int64  `json:"needed_bytes"` // the disks' bytes
	MarginBytes int64  `json:"margin_bytes"`
}

// FailBackupInput marks a backup failed and deletes its partial files.
type FailBackupInput struct {
	BackupID string `json:"backup_id"`
	Reason   string `json:"reason"`
}
