package copier

import (
	"math/rand/v2"
	"testing"

	"github.com/cbtflow/cbtflow/internal/nbd"
)

func TestPlannerChunksAndBlockStatus(t *testing.T) {
	exts := []Extent{{0, 10}, {20, 25}, {100, 3}}
	// Source map: [0,22) data, [22,40) zero, [40,…) data.
	calls := 0
	status := func(off, n int64) ([]nbd.Extent, error) {
		calls++
		all := []nbd.Extent{{Offset: 0, Length: 22}, {Offset: 22, Length: 18, Flags: nbd.StateZero | nbd.StateHole}, {Offset: 40, Length: 1000}}
		var out []nbd.Extent
		for _, e := range all {
			s, end := max(e.Offset, off), min(e.Offset+e.Length, off+n)
			if s < end {
				out = append(out, nbd.Extent{Offset: s, Length: end - s, Flags: e.Flags})
			}
		}
		return out, nil
	}
	p := newPlanner(exts, 0, 4, status)
	p.window = 10 // force more than one block status window per extent, which splits the zero run
	var got []chunk
	for {
		c, ok := p.next()
		if !ok {
			break
		}
		got = append(got, c)
	}
	want := []chunk{
		{0, 4, false}, {4, 4, false}, {8, 2, false},
		{20, 2, false}, {22, 8, true}, {30, 10, true}, {40, 4, false}, {44, 1, false},
		{100, 3, false},
	}
	if len(got) != len(want) {
		t.Fatalf("chunks = %v; want %v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("chunks = %v; want %v", got, want)
		}
	}
	// A window at a time, over the extents larger than a request only:
	// [0,10), [20,30), [30,40), [40,45); {100, 3} is read.
	if calls != 4 {
		t.Errorf("block status asked %d times; want 4, a window at a time over the large extents", calls)
	}
	if p.position() != 103 {
		t.Errorf("position at end = %d; want 103", p.position())
	}
}

func TestPlannerResumeAndStatusFailure(t *testing.T) {
	exts := []Extent{{0, 10}, {20, 10}}
	failing := func(off, n int64) ([]nbd.Extent, error) { return nil, &nbd.Error{Op: "block_status"} }
	p := newPlanner(exts, 25, 4, failing)
	c, ok := p.next()
	if !ok || c != (chunk{25, 4, false}) {
		t.Fatalf("first chunk after resume at 25 = %v %v; want {25 4 data}", c, ok)
	}
	if c, ok := p.next(); !ok || c != (chunk{29, 1, false}) {
		t.Fatalf("second chunk = %v %v; want {29 1 data}", c, ok)
	}
	if _, ok := p.next(); ok {
		t.Fatal("more chunks after the last extent")
	}
	if p.statusErrs != 1 {
		t.Errorf("statusErrs = %d; want 1", p.statusErrs)
	}
	// No block status at all: everything is data, cut at the request size.
	p = newPlanner([]Extent{{0, 9}}, 0, 4, nil)
	var n []int64
	for c, ok := p.next(); ok; c, ok = p.next() {
		if c.zero {
			t.Fatal("zero chunk without block status")
		}
		n = append(n, c.n)
	}
	if len(n) != 3 || n[2] != 1 {
		t.Fatalf("chunk lengths = %v; want [4 4 1]", n)
	}
}

func TestZeroDetection(t *testing.T) {
	b := make([]byte, 300<<10)
	if !isZero(b) {
		t.Fatal("zero buffer not seen as zero")
	}
	b[len(b)-1] = 1
	if isZero(b) {
		t.Fatal("last byte set, still seen as zero")
	}
	b[len(b)-1] = 0

	// Disk offset 12K, granularity 16K: blocks [12K,16K) [16K,32K) ...
	const gran = 16 << 10
	buf := make([]byte, 100<<10)
	buf[5<<10] = 1        // rel 5K: block 1, rel [4K,20K)
	buf[(4+16+1)<<10] = 7 // block 2: rel [20K,36K)
	buf[len(buf)-1] = 9   // last block
	type run struct {
		start, n int
		zero     bool
	}
	var got []run
	zeroRuns(buf, 12<<10, gran, func(s, n int, z bool) { got = append(got, run{s, n, z}) })
	want := []run{
		{0, 4 << 10, true},         // rel [0,4K): disk [12K,16K)
		{4 << 10, 32 << 10, false}, // rel [4K,36K): blocks with bytes at 5K and 21K
		{36 << 10, 48 << 10, true}, // rel [36K,84K)
		{84 << 10, 16 << 10, false},
	}
	if len(got) != len(want) {
		t.Fatalf("runs = %v; want %v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("runs = %v; want %v", got, want)
		}
	}
	// Runs cover the buffer exactly, for random inputs too.
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 200; i++ {
		b := make([]byte, 1+r.IntN(200<<10))
		for j := 0; j < r.IntN(4); j++ {
			b[r.IntN(len(b))] = 1
		}
		pos := 0
		zeroRuns(b, r.Int64N(1<<30), 4096, func(s, n int, z bool) {
			if s != pos || n <= 0 || isZero(b[s:s+n]) != z {
				t.Fatalf("bad run %d+%d zero=%v at pos %d", s, n, z, pos)
			}
			pos += n
		})
		if pos != len(b) {
			t.Fatalf("runs cover %d of %d bytes", pos, len(b))
		}
	}
}

func TestTrackerResumeBookkeeping(t *testing.T) {
	var tr tracker
	if got := tr.low(0); got != 0 {
		t.Fatalf("empty tracker low = %d", got)
	}
	a, b, c := tr.add(0), tr.add(10), tr.add(30)
	b.done = true
	if got := tr.low(40); got != 0 {
		t.Fatalf("low with the first chunk in flight = %d; want 0", got)
	}
	a.done = true
	if got := tr.low(40); got != 30 {
		t.Fatalf("low = %d; want 30 (third chunk in flight)", got)
	}
	c.done = true
	if got := tr.low(40); got != 40 {
		t.Fatalf("low = %d; want the planner position 40", got)
	}
	// Many completions in order keep the queue short.
	for i := int64(0); i < 1000; i++ {
		tr.add(100 + i).done = true
		tr.low(0)
	}
	if len(tr.q)-tr.head > 1 || len(tr.q) > 200 {
		t.Errorf("queue holds %d entries (head %d)", len(tr.q), tr.head)
	}
}

// TestPlannerAligned: with align (a copy into an image it writes
// itself), extents widened to whole units and block status cut anywhere,
// every chunk starts and ends on a unit (the last at the disk's end), a
// zero chunk is only whole units the source reports zero, and together
// the chunks are the widened extents.
func TestPlannerAligned(t *testing.T) {
	const unit, size = 16, 1000
	r := rand.New(rand.NewPCG(5, 6))
	for range 200 {
		// Block status: runs of 1 to 40 bytes, data or zero.
		var all []nbd.Extent
		for off := int64(0); off < size; {
			n := min(r.Int64N(40)+1, size-off)
			var fl uint32
			if r.IntN(2) == 0 {
				fl = nbd.StateZero | nbd.StateHole
			}
			all = append(all, nbd.Extent{Offset: off, Length: n, Flags: fl})
			off += n
		}
		status := func(off, n int64) ([]nbd.Extent, error) {
			var out []nbd.Extent
			for _, e := range all {
				s, end := max(e.Offset, off), min(e.Offset+e.Length, off+n)
				if s < end {
					out = append(out, nbd.Extent{Offset: s, Length: end - s, Flags: e.Flags})
				}
			}
			// A server may answer less than asked.
			return out[:max(1, len(out)/2)], nil
		}
		var exts []Extent
		for off := r.Int64N(30); off < size; {
			n := min(r.Int64N(50)+1, size-off)
			exts = append(exts, Extent{off, n})
			off += n + r.Int64N(60) + 1
		}
		wide := widen(exts, unit, size)
		p := newPlanner(wide, 0, 4*unit, status)
		p.align = unit
		p.window = 7 * unit
		zeroAt := func(off int64) bool {
			for _, e := range all {
				if off >= e.Offset && off < e.Offset+e.Length {
					return e.Zero()
				}
			}
			return false
		}
		var covered []Extent
		for {
			c, ok := p.next()
			if !ok {
				break
			}
			if c.off%unit != 0 || (c.n%unit != 0 && c.off+c.n != size) {
				t.Fatalf("chunk %+v is not whole units of %d (extents %v)", c, unit, wide)
			}
			if c.zero {
				for off := c.off; off < c.off+c.n; off++ {
					if !zeroAt(off) {
						t.Fatalf("zero chunk %+v over data at %d", c, off)
					}
				}
			}
			if n := len(covered); n > 0 && covered[n-1].End() == c.off {
				covered[n-1].Length += c.n
			} else {
				covered = append(covered, Extent{c.off, c.n})
			}
		}
		if len(covered) != len(wide) {
			t.Fatalf("chunks cover %v, the widened extents are %v", covered, wide)
		}
		for i := range wide {
			if covered[i] != wide[i] {
				t.Fatalf("chunks cover %v, the widened extents are %v", covered, wide)
			}
		}
	}
}
