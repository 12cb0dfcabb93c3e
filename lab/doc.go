// Package lab runs a simulated vCenter with real changed block tracking (CBT)
// for cbtflow's demo and tests.
//
// It is govmomi's simulator (the VPX inventory: /DC0, four VMs) extended so
// that every virtual disk is backed by a real sparse raw image in the lab's
// directory. Guest writes go into those images through the lab's Go API or
// its lab-only HTTP endpoints; creating a snapshot freezes each disk (see
// below), stamps a new change ID `<uuid>/<n>` into the snapshot's and the live
// VM config, and QueryChangedDiskAreas answers with the areas really written
// since an earlier change ID, at 64 KiB granularity, with the faults vSphere
// returns. The frozen image of a snapshot's disk is what the worker's `lab`
// disk source serves over NBD in place of VDDK; the worker finds it through
// the endpoints' client in labapi, which keeps the simulator out of the
// worker, and puts in front of it the nbdkit filters the lab names
// (Options.SourceFilters: fault tests inject EIO there).
//
// QueryChangedDiskAreas keeps vCenter's faults apart as vCenter does:
// InvalidArgument for a bad argument or a refused change ID (malformed,
// foreign, newer than the snapshot, of a series CBT ended), FileFault for a
// snapshot taken with CBT off, NotFound for a snapshot that is gone, and
// SystemError for the lab's own failures (a disk it could not freeze, a
// frozen image it cannot read). A client reads the first two as a CBT reset
// and starts a new chain; a SystemError is a failure, never a reset.
//
// # Freezing a disk
//
// A snapshot's frozen image is a plain raw file of the disk's capacity with
// the disk's content at the snapshot. Making it costs nothing that grows
// with the disk, as vSphere's redirect-on-write snapshot does not: the
// image is a second name (a hard link) of the live image's file. The first
// change of the disk while a snapshot holds that image (a guest write, a
// punched hole, a growth, LiveImage for a writer outside the lab) first
// moves the live image to a copy of its own (a sparse copy, holes stay
// holes, renamed over the live image's name), so the snapshot's image,
// and a reader that has it open, keep the content of the freeze. A backup
// takes its snapshot, reads it and removes it with nothing written to the
// disk meanwhile: it copies nothing. A write while a backup holds its
// snapshot costs one copy of the disk's data, as the lab's first freeze
// once did. Without a write in between, snapshots share one image. A
// freeze copies the live image's data instead where the snapshots' folder
// cannot hold a hard link of it (another file system), and, for as long as
// the lab runs, once LiveImage handed the live image to a writer outside
// the lab, which may keep the file open and write it after a snapshot
// (the lab cannot see it close). A reader that keeps
// a removed snapshot's image open (the lab cannot see it) may read what
// is written to the disk later: read a snapshot's disk only while the
// snapshot exists, as on vSphere.
//
// # Configuration changes
//
// The inventory can change under a test, through the Go API, the lab
// endpoints or a plain vSphere client (ReconfigVM_Task, CreateVM_Task,
// Destroy_Task), and the disk images follow:
//
//   - GrowDisk extends a disk, as ReconfigVM with a larger capacityInBytes
//     (or capacityInKB) does. Refused while the VM has snapshots, as vSphere
//     refuses it: ErrHasSnapshots in Go, a failed task with
//     InvalidDeviceOperation for a vSphere client. Capacities are whole KiB
//     (CapacityUnit), so that capacityInKB*1024 always equals
//     capacityInBytes, and disks never shrink (ErrBadCapacity;
//     InvalidDeviceSpec or InvalidDeviceOperation). The image grows sparsely
//     and keeps its content. The change-ID series goes on: a change ID from
//     before the growth still works on later snapshots, and the grown range
//     (from the block holding the old end) is reported as changed besides
//     what was written, a false positive CBT allows.
//   - AddDisk adds a thin disk (the simulator names it after the VM:
//     "[LocalDS_0] vm/vm.vmdk", "vm_1.vmdk", ...) with an empty image. Its
//     change-ID series starts at the next snapshot; allowed with snapshots,
//     which do not know the disk (InvalidArgument for its key).
//   - RemoveDisk removes a disk and deletes its image; stricter than
//     vSphere, it is refused while the VM has snapshots.
//   - CreateVM creates a powered-on VM in /DC0/vm on host DC0_H0 with CBT on
//     and any number of disks, zero included; RemoveVM destroys one, with
//     its snapshots, also while a backup holds one of them: every later
//     call on those snapshots (QueryChangedDiskAreas, RemoveSnapshot_Task,
//     property reads) fails with ManagedObjectNotFound, as on vCenter, and
//     the frozen-image endpoint says the snapshot went with its VM.
//   - RenameSnapshot (the vSphere method, which the stock simulator lacks,
//     or the Go API) renames a snapshot and keeps its moref: to a backup
//     that remembers the moref, the moref now names another snapshot, as
//     after a vCenter restart that reissued it.
//
// VM names are stored as vCenter stores them: "%", "/" and "\" become
// "%25", "%2f" and "%5c" (EscapeName). "web/01" is the VM "web%2f01" with
// folder "[LocalDS_0] web%2f01/", found by govmomi's finder as
// /DC0/vm/web%2f01 (a raw "/" splits the path); "../../etc" is one folder
// "..%2f..%2fetc" inside the datastore. The lab's API and endpoints take a
// VM by moref value, by its stored name or by the name given to CreateVM
// (the client escapes path segments, "." and ".." included).
//
// The lab is a test and demo fixture. It is not a vCenter, not a hypervisor
// and not for production: it has one user, no permissions, keeps its
// inventory in memory (a restart forgets VMs, snapshots and change IDs), and
// its lab endpoints (/cbtflow-lab/...) need no login, which is why it only
// listens on a loopback address.
//
// # Files
//
// Under Options.Dir the lab keeps
//
//	disks/<vm moref>-<key>.raw          live disk images (sparse, full capacity)
//	snapshots/<vm moref>-<key>-<n>.raw  frozen images of snapshot disks (a hard link of the live image until it changes)
//	vcsim/                              the simulator's datastore folders
//	tls.crt, tls.key                    the HTTPS certificate (only when Dir is given)
//
// A frozen image's name is deleted when its last snapshot is removed (the
// live image's file stays where it was its link). Close removes the frozen
// images and the simulator folders. When Dir was given by the caller,
// Close keeps the live disk images and the certificate, so a restarted lab on the same Dir sees the same disk content of the
// default inventory and shows the same thumbprint, but a fresh change-ID
// series: change IDs of an earlier lab are refused. Disks and VMs added by
// an earlier lab are gone with its in-memory inventory: Start deletes their
// images. When Dir is empty the lab works in a temporary directory and
// Close removes all of it.
package lab
