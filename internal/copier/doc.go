// Package copier copies a list of disk extents from an NBD source to an NBD
// target, or into a QCOW2 image it writes itself (Options.Image, through
// qcow2.Writer: no server on that side), the data path of a backup:
// extents in, bytes out.
//
// It keeps many requests in flight through libnbd's asynchronous API with
// buffers allocated in C, so memory stays bounded by InFlight × RequestSize
// per copy; the buffers of finished copies are kept for the next ones
// (pool.go: at most 4 copies' worth, freed after a minute without a copy).
// Data requests are large (2 MiB by default), which is what a QCOW2 target
// served by qemu-nbd digests cheapest; reads are spread over a few source
// connections when the source advertises multi-conn, and every connection
// is driven from one event loop (an image's writes run on a few
// goroutines, which wake it).
// It asks the source for block status over extents larger than a request
// so it does not read holes (a smaller extent is read), and treats zero
// chunks according to the target: skipped on a fresh image, written as
// NBD zeroes (or marked zero in an image's L2 entries) on an overlay,
// where skipping would let the backing file show through. Failed requests
// are retried; a persistent failure names the operation and offset.
// Progress carries a resume point that advances only after a flush of the
// target (an NBD FLUSH, because qemu-nbd acknowledges writes before they
// are durable; or the image writer's Flush, which syncs its data and
// metadata). With Options.Digests it records what it writes: the
// digest of every piece of data (at most 1 MiB, aligned; BLAKE3, or the
// algorithm of a digest file an older release began) and the ranges
// that read as zeros, hashed from the buffers it already holds, committed
// with each resume point (package digest).
//
// It is not a scheduler of disks, nor does it start NBD servers: the caller
// serves the source (and an NBD target) and hands over their URIs, or
// opens the image.
package copier
