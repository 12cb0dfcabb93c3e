package activities

import (
	"testing"
	"time"
)

// A transfer's first attempt is quiet for HeartbeatQuiet, held to half its
// HeartbeatTimeout; a retry (whose details the server holds are an earlier
// attempt's) and an attempt held at fault points heartbeat from the start.
func TestQuietStart(t *testing.T) {
	for _, c := range []struct {
		name        string
		quiet       time.Duration
		attempt     int32
		hbTimeout   time.Duration
		faultPoints bool
		want        time.Duration
	}{
		{"first attempt", 2 * time.Second, 1, 15 * time.Second, false, 2 * time.Second},
		{"first attempt, no heartbeat timeout", 2 * time.Second, 1, 0, false, 2 * time.Second},
		{"first attempt, a short heartbeat timeout", 2 * time.Second, 1, 3 * time.Second, false, 1500 * time.Millisecond},
		{"none set", 0, 1, 15 * time.Second, false, 0},
		{"a retry", 2 * time.Second, 2, 15 * time.Second, false, 0},
		{"a later retry", 2 * time.Second, 7, 15 * time.Second, false, 0},
		{"fault points", 2 * time.Second, 1, 15 * time.Second, true, 0},
	} {
		if got := quietStart(c.quiet, c.attempt, c.hbTimeout, c.faultPoints); got != c.want {
			t.Errorf("%s: quietStart(%s, attempt %d, heartbeat timeout %s, fault points %v) = %s, want %s",
				c.name, c.quiet, c.attempt, c.hbTimeout, c.faultPoints, got, c.want)
		}
	}
}
