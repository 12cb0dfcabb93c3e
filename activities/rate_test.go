package activities

import (
	"math"
	"testing"
	"time"
)

func TestRateMeterFollowsTheRecentSpeed(t *testing.T) {
	m := newRateMeter()
	t0 := time.Unix(1000, 0)
	if r := m.observe(t0, 0); r != 0 {
		t.Fatalf("first sample: rate %v, want 0", r)
	}
	// 10 s at 100 MB/s, sampled every 250 ms.
	var n int64
	var r float64
	for i := 1; i <= 40; i++ {
		n += 25e6
		r = m.observe(t0.Add(time.Duration(i)*250*time.Millisecond), n)
	}
	if math.Abs(r-100e6) > 1e6 {
		t.Fatalf("steady 100 MB/s: rate %v", r)
	}
	// Then 10 s at 10 MB/s: after the window, the old speed is gone.
	for i := 41; i <= 80; i++ {
		n += 2.5e6
		r = m.observe(t0.Add(time.Duration(i)*250*time.Millisecond), n)
	}
	if math.Abs(r-10e6) > 1e6 {
		t.Fatalf("after slowing to 10 MB/s: rate %v", r)
	}
	if len(m.samples) > 30 {
		t.Fatalf("meter keeps %d samples: it must forget those past its window", len(m.samples))
	}
}

func TestRateMeterNeedsAFifthOfASecond(t *testing.T) {
	m := newRateMeter()
	t0 := time.Unix(1000, 0)
	m.observe(t0, 0)
	// 5 MB in 1 ms is no speed to report (and no division by ~0).
	if r := m.observe(t0.Add(time.Millisecond), 5e6); r != 0 {
		t.Fatalf("after 1 ms: rate %v, want 0 (unknown)", r)
	}
	if r := m.observe(t0.Add(time.Second), 50e6); math.Abs(r-50e6) > 1 {
		t.Fatalf("after 1 s: rate %v, want 50e6", r)
	}
}
