package activities_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
)

// threeDeep commits b1 (full) <- b2 <- b3 of disk 2000 and returns them.
func threeDeep(t *testing.T, c *catalogFixture) []activities.CommitDisk {
	t.Helper()
	var out []activities.CommitDisk
	var prev *activities.CommitDisk
	for _, id := range []string{"b1", "b2", "b3"} {
		c.begin(t, id, catVMUUID)
		d := c.image(t, id, 2000, prev)
		if err := c.commit(t, id, d); err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
		prev = &out[len(out)-1]
	}
	return out
}

func damagedOf(t *testing.T, c *catalogFixture, id string) string {
	t.Helper()
	b, err := c.cat.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return b.Disks[0].Damaged
}

func TestBeginBackupFindsDamagedChains(t *testing.T) {
	cases := []struct {
		name   string
		damage func(t *testing.T, c *catalogFixture, imgs []activities.CommitDisk)
		reason string
	}{
		{"middle image truncated", func(t *testing.T, c *catalogFixture, imgs []activities.CommitDisk) {
			if err := os.Truncate(imgs[1].Path, imgs[1].SizeBytes-512); err != nil {
				t.Fatal(err)
			}
		}, "bytes, "},
		{"middle image replaced by another of the same size", func(t *testing.T, c *catalogFixture, imgs []activities.CommitDisk) {
			b, err := os.ReadFile(imgs[1].Path)
			if err != nil {
				t.Fatal(err)
			}
			b[len(b)-1] ^= 0xff
			tmp := imgs[1].Path + ".new"
			if err := os.WriteFile(tmp, b, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, imgs[1].Path); err != nil {
				t.Fatal(err)
			}
		}, "SHA-256"},
		{"middle image deleted", func(t *testing.T, c *catalogFixture, imgs []activities.CommitDisk) {
			if err := os.Remove(imgs[1].Path); err != nil {
				t.Fatal(err)
			}
		}, "missing"},
		{"middle catalog row deleted", func(t *testing.T, c *catalogFixture, imgs []activities.CommitDisk) {
			conn, err := pgx.Connect(context.Background(), c.url)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			if _, err := conn.Exec(context.Background(), `DELETE FROM backup_disks WHERE backup_id = 'b2'`); err != nil {
				t.Fatal(err)
			}
		}, "has no row for disk 2000"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCatalogFixture(t)
			imgs := threeDeep(t, c)
			tc.damage(t, c, imgs)
			r := c.begin(t, "b4", catVMUUID)
			if len(r.Previous) != 1 || r.Previous[0].BackupID != "b3" || !strings.Contains(r.Previous[0].Damaged, tc.reason) {
				t.Fatalf("previous %+v: want b3 with damage naming %q", r.Previous, tc.reason)
			}
			// The reason alone: the plan and the warning add their words.
			if d := r.Previous[0].Damaged; strings.HasPrefix(d, "disk ") || strings.Contains(d, "full backup") || strings.Contains(d, "catalog: ") {
				t.Errorf("damage reason %q is not a bare reason", d)
			}
			if len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "full backup of this disk") || !strings.Contains(r.Warnings[0], "b3") {
				t.Errorf("warnings %q: want one naming the damage, the points marked and the full backup", r.Warnings)
			}
			// b3 builds on the damage: marked; b1 below it stays sound.
			if d := damagedOf(t, c, "b3"); d == "" {
				t.Errorf("b3 is not marked damaged")
			}
			if d := damagedOf(t, c, "b1"); d != "" {
				t.Errorf("b1 (sound, below the damage) is marked %q", d)
			}
			// The next backup still finds it damaged (marked), not sound.
			if r := c.begin(t, "b5", catVMUUID); r.Previous[0].Damaged == "" {
				t.Errorf("second backup: the damaged chain was offered again: %+v", r.Previous)
			}
		})
	}
}

func TestBeginBackupSoundChainAfterMove(t *testing.T) {
	c := newCatalogFixture(t)
	imgs := threeDeep(t, c)
	// Copy an image in place (a moved repository: new inode, same data).
	b, err := os.ReadFile(imgs[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(imgs[0].Path)
	if err := os.WriteFile(imgs[0].Path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	before, _ := c.cat.Get(context.Background(), "b1")
	r := c.begin(t, "b4", catVMUUID)
	if len(r.Previous) != 1 || r.Previous[0].Damaged != "" || len(r.Warnings) != 0 || r.Previous[0].ChainLength != 3 {
		t.Fatalf("a copied but identical image: %+v %q", r.Previous, r.Warnings)
	}
	after, _ := c.cat.Get(context.Background(), "b1")
	if after.Disks[0].Stamp == before.Disks[0].Stamp {
		t.Errorf("the new stamp of the re-hashed image was not recorded")
	}
}

func TestBeginBackupRepositoryFolderMissing(t *testing.T) {
	c := newCatalogFixture(t)
	imgs := threeDeep(t, c)
	if err := os.RemoveAll(filepath.Dir(imgs[0].Path)); err != nil {
		t.Fatal(err)
	}
	_, err := execute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, activities.BeginBackupInput{
		BackupID: "b4", Profile: profileLab, VMUUID: catVMUUID, VMName: "DC0_H0_VM0", Mode: "auto"})
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeRepositoryUnavailable || !app.NonRetryable() || !strings.Contains(err.Error(), "mounted") {
		t.Fatalf("got %v, want a non-retryable RepositoryUnavailable error", err)
	}
	if d := damagedOf(t, c, "b3"); d != "" {
		t.Errorf("an unmounted repository marked restore points damaged: %q", d)
	}
}

func TestCatalogWithoutTablesFailsAtOnce(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d := c.image(t, "b1", 2000, nil)
	staging, err := c.repo.StagingDir("b1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(context.Background(), c.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), `DROP TABLE closed_chains, backup_disks, backups, vms CASCADE`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = c.commit(t, "b1", d)
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeCatalogUnusable || !app.NonRetryable() {
		t.Fatalf("commit into a catalog without tables: %v, want non-retryable CatalogUnusable", err)
	}
	if !strings.Contains(err.Error(), "tables") || time.Since(start) > 30*time.Second {
		t.Errorf("the error should say what is wrong at once: %v after %s", err, time.Since(start))
	}
	// The failure path removes the partial image although no catalog can
	// say which backup it was: the staging folder proves it uncommitted.
	if err := c.fail(t, "b1", "commit failed"); err != nil {
		t.Fatalf("FailBackup with the catalog gone: %v", err)
	}
	if _, err := os.Stat(d.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("partial image left: %v", err)
	}
	if _, err := os.Stat(staging); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staging folder left: %v", err)
	}
}

// A commit may have reached the catalog without the workflow hearing of it
// (the worker died right after): when the catalog then cannot say, the
// failure path keeps the images.
func TestFailBackupKeepsImagesOfAPossiblyCommittedBackup(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d := c.image(t, "b1", 2000, nil)
	staging, err := c.repo.StagingDir("b1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(staging, "committing"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(context.Background(), c.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	// The catalog restored from a dump taken before the backup: it does
	// not know it.
	if _, err := conn.Exec(context.Background(), `DELETE FROM backups WHERE id = 'b1'`); err != nil {
		t.Fatal(err)
	}
	if err := c.fail(t, "b1", "the workflow did not hear back from its commit"); err != nil {
		t.Fatalf("FailBackup: %v", err)
	}
	if _, err := os.Stat(d.Path); err != nil {
		t.Errorf("the image of a backup that may be committed was removed: %v", err)
	}
	if _, err := os.Stat(staging); err != nil {
		t.Errorf("the staging folder went, so no sweep would ask the catalog again: %v", err)
	}
}

func TestCommitRefusesAnImageWrittenAfterItsHash(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d := c.image(t, "b1", 2000, nil)
	st := activities.FileStamp{Inode: 1, MtimeNs: 2, CtimeNs: 3} // not the file's
	d.Stamp = &st
	err := c.commit(t, "b1", d)
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || !app.NonRetryable() || !strings.Contains(err.Error(), "written after the transfer hashed it") {
		t.Fatalf("commit of an image whose stamp changed since its hash: %v, want a non-retryable refusal", err)
	}
	b, err := c.cat.Get(context.Background(), "b1")
	if err != nil || b.Status != "running" {
		t.Errorf("after the refusal the backup is %+v (%v), want running, uncommitted", b, err)
	}
}
