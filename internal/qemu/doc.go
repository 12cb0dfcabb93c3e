// Package qemu runs the external programs of cbtflow's data path: qemu-img
// (create a full image or an overlay, info, check, compare, convert) and the
// NBD servers that expose images and snapshot disks — qemu-nbd for QCOW2
// targets and raw images, nbdkit for plugins such as file or vddk.
//
// Every server runs in the foreground as a child that dies with its parent
// (Pdeathsig, and nbdkit's --exit-with-parent), listens on a unix socket
// inside a private 0700 directory, and is stopped by Close, which also
// removes the socket. A pid file next to the socket lets a retried attempt
// stop a server that a killed predecessor left behind.
//
// The package knows nothing of vSphere, Temporal or the catalog; it only
// builds argument vectors, runs the programs and parses their output.
package qemu
