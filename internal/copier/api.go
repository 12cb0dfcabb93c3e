package copier

import (
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/qcow2"
)

// Extent is a byte range of the disk that must be copied, as CBT
// (QueryChangedDiskAreas) reports it. A list of extents handed to Copy is
// sorted by Offset and its extents do not overlap.
type Extent struct {
	Offset int64 // first byte of the range
	Length int64 // number of bytes, > 0
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// Ranges are the extents as ranges of an image (qcow2.Create's and
// qcow2.OpenWriter's written ranges).
func Ranges(exts []Extent) []qcow2.Range {
	rs := make([]qcow2.Range, len(exts))
	for i, e := range exts {
		rs[i] = qcow2.Range{Offset: e.Offset, Length: e.Length}
	}
	return rs
}

// widen returns exts widened to whole units of gran (each end rounded up,
// but not past size where the extent ends within it), merged where they
// then touch.
func widen(exts []Extent, gran, size int64) []Extent {
	var out []Extent
	for _, e := range exts {
		lo, hi := e.Offset/gran*gran, (e.End()+gran-1)/gran*gran
		if hi > size && e.End() <= size {
			hi = size
		}
		if n := len(out); n > 0 && lo <= out[n-1].End() {
			out[n-1].Length = max(out[n-1].End(), hi) - out[n-1].Offset
			continue
		}
		out = append(out, Extent{Offset: lo, Length: hi - lo})
	}
	return out
}

// Defaults used where an Options field is left zero.
//
// Large data requests pay off on every hop: a qemu-nbd QCOW2 target spends
// about a third less CPU per byte on 2 MiB writes than on 256 KiB ones
// (fewer coroutines, thread-pool jobs and cluster lookups), nbdkit and the
// copier fewer wake-ups. Measured on the bench disk (1 MiB+ extents), 2 MiB
// × 8 beat 256 KiB × 16 by about a third; deeper queues of small requests
// (256 KiB × 64) did not help. Requests never span extents, so small CBT
// areas make small requests: 1771 scattered 64 KiB areas copied no slower
// with 8 in flight over 3 source connections than with 16 over one.
const (
	DefaultRequestSize       = 2 << 20 // bytes per data request; see above
	DefaultInFlight          = 8       // requests in flight: at most 16 MiB of buffers (see fittedRequestSize)
	DefaultSourceConnections = 3       // when the source allows multi-conn
	DefaultRetries           = 3       // extra attempts of a failed request
	DefaultRetryBackoff      = 100 * time.Millisecond
	DefaultFlushInterval     = 5 * time.Second
	DefaultProgressInterval  = 250 * time.Millisecond
	DefaultSparseSize        = 64 << 10 // granularity of zero detection
)

// Options describe one copy. Source, Target or Image, and Extents are
// required; every other field has a default.
type Options struct {
	// Source and Target are NBD URIs (nbd+unix:///?socket=PATH, nbd://host/…).
	// The source is only read; the target must be at least as large as the
	// end of the last extent.
	Source, Target string

	// Extents are the areas to copy: sorted, non-overlapping.
	Extents []Extent

	// Image, instead of Target, is a QCOW2 image the copier writes itself
	// (qcow2.Writer, opened by the caller, who closes it): no NBD server
	// on the target side. Every write and zero then covers whole
	// subclusters of the image, so nothing is read from its backing file:
	// the extents are widened to them (clamped to the disk's end), the
	// rest of each subcluster copied from the source, which holds it too;
	// ResumeFrom must be on a subcluster, as every resume point of such a
	// copy is. Its final flush makes the data and the image's metadata
	// durable.
	Image *qcow2.Writer

	// Overlay says the target is a QCOW2 overlay over older data. Zero chunks
	// (all-zero reads and holes reported by the source's block status) are
	// then written as NBD zeroes (marked zero in an Image's L2 entries), so
	// the backing file cannot show through.
	// On a fresh image (Overlay false) they are skipped: the image reads as
	// zero already.
	Overlay bool

	// ResumeFrom is a resume point from an earlier attempt on the same
	// target (Progress.ResumePoint): extent bytes below it are not copied.
	ResumeFrom int64

	// RequestSize is the size of one read/write request in bytes; InFlight
	// the number of read/write requests in flight at once. Memory use is
	// about RequestSize × InFlight, independent of the disk size, and less
	// for a copy whose extents are all smaller than RequestSize: its
	// requests are then the size of its largest (fittedRequestSize).
	RequestSize int
	InFlight    int

	// SourceConnections is how many connections read from the source when
	// it advertises multi-conn (one image seen by every connection); a
	// source without multi-conn gets one. Reads are spread over them: nbdkit
	// sends one reply at a time per connection, so several connections keep
	// several replies streaming (3 measured about 10% faster than 2 and as
	// fast as 4 on the bench). Set 1 where a connection is costly. A copy
	// of less than 32 MiB of data (multiConnBytes) reads over one.
	SourceConnections int

	// SparseSize is the granularity (bytes) at which data read from the
	// source is checked for zeros: an all-zero block of this size is skipped
	// (fresh image) or written as an NBD zero (overlay). Default 64 KiB, a
	// subcluster of the repository's images; with Image, rounded to whole
	// subclusters.
	SparseSize int

	// Retries is how many more times a failed request is tried, after
	// RetryBackoff, doubled on each attempt. Negative means no retry.
	Retries      int
	RetryBackoff time.Duration

	// FlushInterval and FlushBytes decide when the target is flushed during
	// the copy so the resume point advances: after FlushInterval since the
	// last flush, or after FlushBytes written or zeroed since the last flush
	// (0: no byte limit). The copy always ends with a flush.
	FlushInterval time.Duration
	FlushBytes    int64

	// Digests, when set, is given a record of every range of the extents
	// this call copies (package digest): the digest, with the sink's
	// Algorithm, of each range of data read from the source, cut at
	// digest.BlockSize boundaries of the disk, and a zero record for each
	// range the target reads as zeros (a hole in the source's block
	// status, or data read as all zero, whether written as NBD zeroes or
	// skipped). The data is hashed from the
	// request's buffer after its writes are sent, while the target works.
	// Before the resume point advances past a record, Commit is called
	// with the new resume point, and its error ends the copy: records
	// below a reported resume point are as durable as the data.
	Digests DigestSink

	// Progress, when set, is called from the copying goroutine at most every
	// ProgressInterval, whenever the resume point advances and once at the
	// end. It must return quickly: the pipeline waits for it.
	Progress         func(Progress)
	ProgressInterval time.Duration
}

// Progress is a snapshot of a running copy.
type Progress struct {
	// Total is the sum of the extents' lengths; Done the part already
	// handled (read and written, zeroed or skipped, plus whatever lay below
	// ResumeFrom). Done is not durable: see ResumePoint.
	Total, Done int64

	// Read, Written, Zeroed and Skipped count bytes handled by this call:
	// read from the source, written as data, written as NBD zeroes, and
	// skipped as zero on a fresh image.
	Read, Written, Zeroed, Skipped int64

	// Retried counts requests that failed and were tried again.
	Retried int64

	// ResumePoint is a byte offset below which every extent byte is durable
	// in the target: it advances only after a FLUSH that completed after
	// every request below it. Pass it as Options.ResumeFrom to continue.
	ResumePoint int64
}

// Result is what a finished copy did. Its counters cover this call only.
type Result struct {
	Read, Written, Zeroed, Skipped int64
	Retried                        int64
	Flushes                        int64
	// ResumePoint is the end of the last extent once the final flush
	// succeeded (with Image, of the last extent widened to subclusters,
	// which can lie past the caller's, up to the disk's end).
	ResumePoint int64
	Duration    time.Duration
}

// DigestSink receives the copy's digest records (digest.Writer is one).
// Its methods are called from the copying goroutine and must not keep it
// long: Commit syncs a small file every FlushInterval or so.
type DigestSink interface {
	// Algorithm is the hash the data records are made with: the digest
	// file's (its header's algorithm).
	Algorithm() digest.Algorithm
	// Add takes a record; records arrive in completion order.
	Add(digest.Record)
	// Commit makes every record ending at or below resumePoint durable.
	Commit(resumePoint int64) error
}
