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
