package chaos

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/catalog"
)

// chainDamage damages the chain of a disk between backups, as an
// administrator's bad day would: the middle restore point's image
// truncated, replaced by other data of the same size and times, deleted,
// or its catalog row deleted. The next backup must complete at once as a
// full backup of that disk with a warning naming the damage, the damaged
// point and those built on it must be marked (and nothing else), every
// other restore point must restore byte for byte, and the backup after
// must be incremental on the new full.
func chainDamage(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "chain"})
	tl := tallied(t, "chain damaged between backups")
	damages := []struct {
		name   string
		reason string
		apply  func(path, backupID string, key int32) error
	}{
		{"truncated", "bytes, ", func(path, _ string, _ int32) error {
			fi, err := os.Stat(path)
			if err != nil {
				return err
			}
			return os.Truncate(path, fi.Size()/2)
		}},
		// The file's last byte: in a data record (its digest differs:
		// BLAKE3 in the files written now, SHA-256 in older ones), or
		// outside them (the seal, a SHA-256, differs).
		{"replaced", "holds other data|has seal", func(path, _ string, _ int32) error {
			fi, err := os.Stat(path)
			if err != nil {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			b[len(b)-1] ^= 0xa5
			if err := os.WriteFile(path+".new", b, 0o600); err != nil {
				return err
			}
			if err := os.Chtimes(path+".new", fi.ModTime(), fi.ModTime()); err != nil {
				return err
			}
			return os.Rename(path+".new", path)
		}},
		{"deleted", "missing", func(path, _ string, _ int32) error { return os.Remove(path) }},
		{"catalog row deleted", "has no row", func(_, backupID string, key int32) error {
			conn, err := pgx.Connect(ctx, e.dbURL)
			if err != nil {
				return err
			}
			defer conn.Close(ctx)
			_, err = conn.Exec(ctx, `DELETE FROM backup_disks WHERE backup_id = $1 AND disk_key = $2`, backupID, key)
			return err
		}},
	}
	seed := uint64(800)
	for i, dmg := range damages {
		vm := vms[i%len(vms)]
		label := func(n int) string { return fmt.Sprintf("chain-%d-%d", i+1, n) }
		var chain []*run
		for n := 1; n <= 3; n++ {
			seed++
			r := e.backup(tl, label(n), vm, seed, 32*MiB, nil, false, backupTimeout)
			e.check(tl, r)
			chain = append(chain, r)
		}
		if !chain[2].completed || len(chain[1].out.Disks) == 0 {
			continue // reported by the checks
		}
		mid := chain[1].out.Disks[0]
		if mid.Mode != "incremental" || chain[2].out.Disks[0].Mode != "incremental" {
			e.problem(tl, "%s: the chain to damage is %s <- %s, want two incrementals", label(3), mid.Mode, chain[2].out.Disks[0].Mode)
			continue
		}
		if err := dmg.apply(mid.Path, chain[1].out.BackupID, mid.Key); err != nil {
			t.Fatal(err)
		}
		// The catalog-row case leaves the point without that disk, which
		// therefore cannot be marked; the point built on it is.
		if !strings.Contains(dmg.reason, "row") {
			e.damaged[fmt.Sprintf("%s/%d", chain[1].out.BackupID, mid.Key)] = true
		}
		e.damaged[fmt.Sprintf("%s/%d", chain[2].out.BackupID, mid.Key)] = true

		seed++
		r := e.backup(tl, label(4)+" ("+dmg.name+")", vm, seed, 32*MiB, nil, false, backupTimeout)
		if r.completed {
			for _, d := range r.out.Disks {
				if d.Key == mid.Key && d.Mode != "full" {
					e.problem(tl, "%s: disk %d is %s after its chain was damaged (%s), want full", r.label, d.Key, d.Mode, dmg.name)
				}
				if d.Key != mid.Key && d.Mode != "incremental" {
					e.problem(tl, "%s: healthy disk %d is %s, want incremental", r.label, d.Key, d.Mode)
				}
			}
			warned := false
			for _, w := range r.out.Warnings {
				named := false
				for _, reason := range strings.Split(dmg.reason, "|") {
					named = named || strings.Contains(w, reason)
				}
				warned = warned || (strings.Contains(w, "chain damaged") && named && strings.Contains(w, strconv.Itoa(int(mid.Key))))
			}
			if !warned {
				e.problem(tl, "%s: no warning naming the damage (%s) among %q", r.label, dmg.reason, r.out.Warnings)
			}
		}
		e.check(tl, r)
		e.refused(tl, chain[2].out.BackupID, mid.Key)
		seed++
		r = e.backup(tl, label(5), vm, seed, 32*MiB, nil, false, backupTimeout)
		for _, d := range r.out.Disks {
			if d.Mode != "incremental" {
				e.problem(tl, "%s: disk %d is %s after the new full, want incremental", r.label, d.Key, d.Mode)
			}
		}
		e.check(tl, r)
	}
	return []*Tally{tl}
}

// refused checks that a restore of a damaged point is refused, naming the
// damage, and writes nothing.
func (e *env) refused(tl *Tally, backupID string, key int32) {
	out := filepath.Join(e.data, "refused.raw")
	res, err := e.s.Starter(e.ctx, "restore", backupID, "--disk", strconv.Itoa(int(key)), "--to", out)
	if err != nil || res.ExitCode != 1 || !strings.Contains(res.Stderr, "damaged") {
		e.problem(tl, "restore of damaged %s disk %d: %v %s; want it refused naming the damage", backupID, key, err, res)
	}
	if _, err := os.Stat(out); err == nil {
		e.problem(tl, "a refused restore of %s left %s", backupID, out)
		_ = os.Remove(out)
	}
	cat, err := catalog.Open(e.ctx, e.dbURL)
	if err != nil {
		e.t.Fatal(err)
	}
	defer cat.Close()
	if b, err := cat.Get(e.ctx, backupID); err != nil || len(b.Disks) == 0 {
		e.problem(tl, "damaged %s is gone from the catalog (%v): it must stay, marked", backupID, err)
	}
}
