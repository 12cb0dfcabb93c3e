// Package vsphere is cbtflow's client of the vSphere API (govmomi): vCenter
// profiles and their logged-in sessions, finding a VM and its disks,
// switching changed block tracking (CBT) on, creating, finding and removing
// the backup's snapshot, and paging through QueryChangedDiskAreas.
//
// Every call names a VM by moref value ("vm-62") once it has been resolved
// (FindVM, VMByUUID), so that activities can pass plain strings through
// workflow history. Change IDs and backing file names always come from a
// snapshot's config, never from the live VM: the live disk moves on to a
// delta file and a new change ID as soon as a snapshot exists.
//
// Sessions keeps one login per vCenter profile, keeps it alive and logs in
// again when vCenter drops it; a password is read from the profile's
// password file at login and never appears in logs or errors.
//
// The package does not move disk data (see internal/source and
// internal/copier), does not decide between full and incremental backups
// (the workflow does), and knows nothing of Temporal.
package vsphere
