// Package snapshotfaults holds whole-stack tests (package stack: the
// Temporal dev server, the lab vCenter, a worker process, a fresh
// database) of what cbtflow does when the snapshot a running backup holds
// changes under it: its VM removed in the middle of the copy, or its moref
// naming another snapshot (an administrator's) after the snapshot was
// taken. In both, the backup fails within a bounded time with a message
// that names what happened, commits nothing, leaves no image and no
// process behind, touches no snapshot but its own, and the lab and the
// next backup go on. The package has only tests.
package snapshotfaults
