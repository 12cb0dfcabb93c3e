package copier

import (
	"bytes"

	"github.com/cbtflow/cbtflow/internal/nbd"
)

// chunk is one request's worth of an extent: data to read, or a range the
// source's block status reports as zero (never read).
type chunk struct {
	off, n int64
	zero   bool
}

// statusFunc answers block status for [off, off+n); it may cover less.
type statusFunc func(off, n int64) ([]nbd.Extent, error)

// planner cuts the extents into chunks, in offset order, split where the
// source's block status changes between data and zero. It asks for block
// status one window at a time, so its memory does not grow with the disk,
// and only over an extent larger than a request: a smaller one is read
// (what reads as zeros is found zero then), since a block status round
// trip costs about what reading it does, and asked over the gaps between
// small extents it took a quarter of an incremental's copy (nbdkit's file
// plugin: 6 ms for a GiB holding 75 pieces).
type planner struct {
	exts    []Extent
	i       int
	pos     int64 // everything below pos is planned
	reqSize int64
	maxZero int64
	// align, when above 1, is the unit every chunk starts and ends on
	// (but the last extent's end): a zero chunk is only what block status
	// reports zero in whole units, the rest is read as data.
	align int64

	status     statusFunc // nil: the source has no block status
	window     int64
	win        []nbd.Extent
	wi         int
	winStart   int64
	winEnd     int64
	statusErrs int // block status failures; those windows were read as data
}

// Block status is asked for this much of the disk at once.
const statusWindow = 1 << 30

// Zero requests cover at most this many bytes: large enough that zeroing an
// overlay costs few round trips, small enough for a 32-bit NBD length.
const maxZeroRequest = 256 << 20

func newPlanner(exts []Extent, resumeFrom, reqSize int64, status statusFunc) *planner {
	return &planner{exts: exts, pos: resumeFrom, reqSize: reqSize, maxZero: maxZeroRequest,
		status: status, window: statusWindow}
}

// position returns an offset below which every extent byte has been
// planned; at the end it is the end of the last extent (or the resume
// point, when that lies beyond).
func (p *planner) position() int64 { return p.pos }

// next returns the next chunk, or false when all extents are planned.
func (p *planner) next() (chunk, bool) {
	for p.i < len(p.exts) {
		e := p.exts[p.i]
		if p.pos < e.Offset {
			p.pos = e.Offset
		}
		if p.pos >= e.End() {
			p.i++
			continue
		}
		limit, zero := e.End(), false
		if p.status != nil && e.Length > p.reqSize {
			if p.pos < p.winStart || p.pos >= p.winEnd {
				p.fetch(e.End())
			}
			for p.win[p.wi].Offset+p.win[p.wi].Length <= p.pos {
				p.wi++
			}
			w := p.win[p.wi]
			zero = w.Zero()
			end := w.Offset + w.Length
			if p.align > 1 {
				down, up := end/p.align*p.align, (end+p.align-1)/p.align*p.align
				switch {
				case !zero:
					end = up
				case down > p.pos:
					end = down
				default: // less than a unit of zeros: read
					zero, end = false, up
				}
			}
			limit = min(limit, end)
		}
		max := p.reqSize
		if zero {
			max = p.maxZero
		}
		c := chunk{off: p.pos, n: min(limit-p.pos, max), zero: zero}
		p.pos += c.n
		return c, true
	}
	return chunk{}, false
}

// fetch loads the block status window starting at p.pos, up to end (the
// current extent's). A failure is not fatal: the window is then read as
// data, which costs time, never correctness, since read data is checked
// for zeros anyway.
func (p *planner) fetch(end int64) {
	n := min(p.window, end-p.pos)
	win, err := p.status(p.pos, n)
	if err != nil || len(win) == 0 || win[0].Offset != p.pos {
		p.statusErrs++
		win = []nbd.Extent{{Offset: p.pos, Length: n}}
	}
	p.win, p.wi = win, 0
	p.winStart = p.pos
	last := win[len(win)-1]
	p.winEnd = last.Offset + last.Length
}

// zeroPage is compared against; bytes.Equal is vectorised, so checking a
// block costs a fraction of copying it, and non-zero data fails fast.
var zeroPage = make([]byte, 64<<10)

// isZero reports whether b is all zero bytes.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// zeroRuns splits b, read from disk offset off, into maximal runs of blocks
// that are all zero or not, with block boundaries at multiples of gran on
// the disk (so runs line up with the target's clusters), and calls fn for
// each run with its position in b.
func zeroRuns(b []byte, off int64, gran int, fn func(start, n int, zero bool)) {
	runStart, runZero := 0, false
	for i := 0; i < len(b); {
		// The first block may be partial, to reach a gran boundary.
		n := gran - int((off+int64(i))%int64(gran))
		n = min(n, len(b)-i)
		z := isZero(b[i : i+n])
		if i == 0 {
			runZero = z
		} else if z != runZero {
			fn(runStart, i-runStart, runZero)
			runStart, runZero = i, z
		}
		i += n
	}
	if len(b) > 0 {
		fn(runStart, len(b)-runStart, runZero)
	}
}

// span is a chunk in flight, in the order chunks were planned.
type span struct {
	off  int64
	done bool
}

// tracker knows the lowest offset not yet completed: chunks complete out of
// order, and a resume point may only pass a chunk once it and every chunk
// before it completed.
type tracker struct {
	q    []*span
	head int
}

// add records a chunk starting at off; chunks are added in offset order.
func (t *tracker) add(off int64) *span {
	s := &span{off: off}
	t.q = append(t.q, s)
	return s
}

// low returns an offset below which every planned chunk completed; next is
// the planner's position, the answer when nothing is in flight.
func (t *tracker) low(next int64) int64 {
	for t.head < len(t.q) && t.q[t.head].done {
		t.q[t.head] = nil
		t.head++
	}
	if t.head > 64 && t.head*2 > len(t.q) {
		t.q = append(t.q[:0], t.q[t.head:]...)
		t.head = 0
	}
	if t.head < len(t.q) {
		return t.q[t.head].off
	}
	return next
}
