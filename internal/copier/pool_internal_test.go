package copier

import (
	"testing"

	"github.com/cbtflow/cbtflow/internal/nbd"
)

// kept returns the bytes the pool holds.
func (p *bufferPool) kept() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bytes
}

func TestBufferPool(t *testing.T) {
	p := &bufferPool{free: map[int][]*nbd.Buffer{}}
	a := p.get(DefaultRequestSize)
	p.put(a)
	if got := p.kept(); got != DefaultRequestSize {
		t.Fatalf("kept %d after one put; want %d", got, DefaultRequestSize)
	}
	if b := p.get(DefaultRequestSize); b != a {
		t.Error("a kept buffer was not handed out again")
	} else {
		p.put(b)
	}
	if b := p.get(64 << 10); b == a || b.Len() != 64<<10 {
		t.Errorf("a buffer of another size: got %d bytes (the kept one: %v)", b.Len(), b == a)
	} else {
		b.Free()
	}

	// Beyond poolMaxBytes, buffers are freed, not kept.
	var held []*nbd.Buffer
	for range poolMaxBytes/DefaultRequestSize + 3 {
		held = append(held, p.get(DefaultRequestSize))
	}
	for _, b := range held {
		p.put(b)
	}
	if got := p.kept(); got != poolMaxBytes {
		t.Errorf("kept %d after putting %d buffers; want at most %d", got, len(held), poolMaxBytes)
	}
	kept := 0
	for _, b := range held {
		if b.Len() != 0 { // Free zeroes it
			kept++
		}
	}
	if kept != poolMaxBytes/DefaultRequestSize {
		t.Errorf("%d buffers still allocated; want the %d kept", kept, poolMaxBytes/DefaultRequestSize)
	}

	// Idle, it frees everything.
	p.drain()
	if got := p.kept(); got != 0 {
		t.Errorf("kept %d after drain", got)
	}
	for _, b := range held {
		if b.Len() != 0 {
			t.Fatal("a buffer survived drain")
		}
	}
	p.idle.Stop()
}

// A copy's requests, and so its buffers, are no larger than its largest
// extent needs, in whole units of zero detection and of the image's
// subclusters; never larger than the request size asked for.
func TestFittedRequestSize(t *testing.T) {
	ext := func(lens ...int64) []Extent {
		var out []Extent
		off := int64(0)
		for _, n := range lens {
			out = append(out, Extent{Offset: off, Length: n})
			off += n + 1<<20
		}
		return out
	}
	for _, c := range []struct {
		name string
		o    Options
		want int
	}{
		{"scattered 64 KiB areas", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(64<<10, 64<<10)}, 64 << 10},
		{"the largest rounded up", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(64<<10, 200<<10, 4<<10)}, 256 << 10},
		{"to a power of two of the unit", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(320 << 10)}, 512 << 10},
		{"at most the request size", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(1100 << 10)}, 2 << 20},
		{"a tiny area: one unit", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(512)}, 64 << 10},
		{"zero detection's unit", Options{RequestSize: 2 << 20, SparseSize: 256 << 10, Extents: ext(64 << 10)}, 256 << 10},
		{"an extent of a request or more", Options{RequestSize: 2 << 20, SparseSize: 64 << 10, Extents: ext(64<<10, 3<<20)}, 2 << 20},
		{"a request size below the unit", Options{RequestSize: 32 << 10, SparseSize: 64 << 10, Extents: ext(64 << 10)}, 32 << 10},
		{"no extents", Options{RequestSize: 2 << 20, SparseSize: 64 << 10}, 64 << 10},
	} {
		if got := fittedRequestSize(c.o); got != c.want {
			t.Errorf("%s: %d, want %d", c.name, got, c.want)
		}
	}
}
