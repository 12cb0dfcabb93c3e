// Package lab runs a simulated vCenter with real changed block tracking (CBT)
// for cbtflow's demo and tests.
//
// It is govmomi's simulator (the VPX inventory: /DC0, four VMs) extended so
// that every virtual disk is backed by a real sparse raw image in the lab's
// directory. Guest writes go into those images through the lab's Go API or
// its lab-only HTTP endpoints; creating a snapshot freezes each disk (a sparse
// copy), stamps a new change ID `<uuid>/<n>` into the snapshot's and the live
// VM config, and QueryChangedDiskAreas answers with the areas really written
// since an earlier change ID, at 64 KiB granularity, with the faults vSphere
// returns. The frozen image of a snapshot's disk is what the worker's `lab`
// disk source serves over NBD in place of VDDK.
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
//	snapshots/<vm moref>-<key>-<n>.raw  frozen images of snapshot disks
//	vcsim/                              the simulator's datastore folders
//	tls.crt, tls.key                    the HTTPS certificate (only when Dir is given)
//
// Close removes the frozen images and the simulator folders. When Dir was
// given by the caller, Close keeps the live disk images and the certificate,
// so a restarted lab on the same Dir sees the same disk content and shows the
// same thumbprint, but a fresh change-ID series: change IDs of an earlier lab
// are refused. When Dir is empty the lab works in a temporary directory and
// Close removes all of it.
package lab
