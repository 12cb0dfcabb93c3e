package units

import (
	"testing"
	"time"
)

func TestBytes(t *testing.T) {
	for _, c := range []struct {
		n    int64
		want string
	}{{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"}, {9 << 20, "9.0 MiB"}, {3435973837, "3.2 GiB"}, {2 << 40, "2.0 TiB"}, {-2048, "-2.0 KiB"}} {
		if got := Bytes(c.n); got != c.want {
			t.Errorf("Bytes(%d) = %q, want %q", c.n, got, c.want)
		}
	}
}

func TestDuration(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want string
	}{{250 * time.Millisecond, "250ms"}, {4200 * time.Millisecond, "4.2s"}, {30 * time.Second, "30s"},
		{12*time.Minute + 30*time.Second, "12m30s"}, {24 * time.Hour, "24h"}, {90 * time.Minute, "1h30m"}, {-time.Second, "-1s"},
		{0, "0s"}, {90 * time.Second, "1m30s"}, {26 * time.Hour, "26h"}, {15 * time.Minute, "15m"}, {-2 * time.Hour, "-2h"}} {
		if got := Duration(c.d); got != c.want {
			t.Errorf("Duration(%v) = %q, want %q", c.d, got, c.want)
		}
	}
	if got := Seconds(4.25); got != "4.2s" && got != "4.3s" {
		t.Errorf("Seconds(4.25) = %q", got)
	}
}
