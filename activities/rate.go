package activities

import "time"

// rateMeter measures the recent speed of a growing byte count: the bytes
// per second over about the last rateWindow, so that a stall or a burst
// shows within seconds and an ETA follows the current speed, not the
// average since the start.
type rateMeter struct {
	samples []rateSample // oldest first; the first is at most one sample older than the window
	last    float64
}

type rateSample struct {
	at time.Time
	n  int64
}

// rateWindow is how far back a rateMeter looks.
const rateWindow = 5 * time.Second

func newRateMeter() *rateMeter { return &rateMeter{} }

// observe records that the count is n at time at, and returns the speed
// in bytes per second (0 until a fifth of a second has been seen).
func (m *rateMeter) observe(at time.Time, n int64) float64 {
	m.samples = append(m.samples, rateSample{at: at, n: n})
	drop := 0
	for drop < len(m.samples)-2 && at.Sub(m.samples[drop+1].at) >= rateWindow {
		drop++
	}
	m.samples = m.samples[drop:]
	first := m.samples[0]
	dt := at.Sub(first.at).Seconds()
	if dt < 0.2 {
		return m.last
	}
	m.last = max(float64(n-first.n)/dt, 0)
	return m.last
}
