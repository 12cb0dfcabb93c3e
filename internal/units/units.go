// Package units writes sizes and durations as a person reads them, the
// same way in every output of cbtflow (the starter's, the workflows'
// results in the Web UI).
package units

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Bytes is n in binary units: 512 B, 1.5 KiB, 9.0 MiB, 3.2 GiB.
func Bytes(n int64) string {
	const unit = 1024
	if n < 0 {
		return "-" + Bytes(-n)
	}
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Duration is d as a person reads it: 250ms, 4.2s, 30s, 12m30s, 24h,
// 1h30m (no zero units, whole seconds from a minute on).
func Duration(d time.Duration) string {
	if d < 0 {
		return "-" + Duration(-d)
	}
	if d < time.Minute {
		switch {
		case d%time.Second == 0:
			return fmt.Sprintf("%ds", d/time.Second)
		case d < time.Second:
			return fmt.Sprintf("%dms", d.Milliseconds())
		}
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s"
	}
	d = d.Round(time.Second)
	var b strings.Builder
	for _, u := range []struct {
		d    time.Duration
		name string
	}{{time.Hour, "h"}, {time.Minute, "m"}, {time.Second, "s"}} {
		if n := d / u.d; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.name)
			d -= n * u.d
		}
	}
	return b.String()
}

// Seconds is Duration of a number of seconds.
func Seconds(s float64) string {
	return Duration(time.Duration(s * float64(time.Second)))
}
