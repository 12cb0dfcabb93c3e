package testutil

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// AdminDatabaseURL is the database tests connect to in order to create
// their own: $CBTFLOW_TEST_DATABASE_URL, or the local server's postgres
// database over its unix socket (peer or trust authentication as the
// current user, which scripts/deps sets up).
func AdminDatabaseURL() string {
	if u := os.Getenv("CBTFLOW_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres:///postgres?host=/var/run/postgresql"
}

// Database creates a fresh, empty database for one test and drops it when
// the test ends. It returns the new database's URL. It fails the test when
// PostgreSQL does not answer: a test that needs the database never skips.
func Database(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := AdminDatabaseURL()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("PostgreSQL is required (run scripts/deps): %v", err)
	}
	defer conn.Close(ctx)
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "cbtflow_test_" + hex.EncodeToString(b)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Errorf("drop test database %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop test database %s: %v", name, err)
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("admin database URL: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}
