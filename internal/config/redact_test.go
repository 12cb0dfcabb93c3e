package config

import (
	"strings"
	"testing"
)

func TestRedactDatabaseURL(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"postgres://u:s3cret@db:5432/cbtflow", "postgres://u:xxxxx@db:5432/cbtflow"},
		{"postgres://u@db/cbtflow?password=s3cret&sslmode=verify-full", "postgres://u@db/cbtflow?password=xxxxx&sslmode=verify-full"},
		{"postgres://u@db/cbtflow?sslpassword=s3cret", "postgres://u@db/cbtflow?sslpassword=xxxxx"},
		{"host=db user=u password=s3cret dbname=cbtflow", "host=db user=u password=xxxxx dbname=cbtflow"},
		{"host=db sslpassword='a s3cret' dbname=cbtflow", "host=db sslpassword=xxxxx dbname=cbtflow"},
		{"postgres://u@db/cbtflow?sslmode=disable", "postgres://u@db/cbtflow?sslmode=disable"},
		{"postgres:///cbtflow?host=/var/run/postgresql", "postgres:///cbtflow?host=/var/run/postgresql"},
		{"postgres://%zz@db", "postgres://(malformed URL)"},
	} {
		got := RedactDatabaseURL(c.in)
		if got != c.want || strings.Contains(got, "s3cret") {
			t.Errorf("RedactDatabaseURL(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
