package activities_test

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/lab"
)

func TestSpaceNeeded(t *testing.T) {
	const mib = 1 << 20
	disks := []activities.SpaceDisk{
		{Key: 204, Mode: activities.ModeFull, Bytes: 2000 * mib, Basis: activities.SpaceAllocated},
		{Key: 205, Mode: activities.ModeIncremental, Bytes: 40 * mib, Basis: activities.SpaceEstimated, Incrementals: 3},
	}
	n, margin := activities.SpaceNeeded(disks)
	if n != 2040*mib {
		t.Errorf("needed %d, want the disks' 2040 MiB", n)
	}
	// 5% of 2040 MiB is 102 MiB; plus 64 MiB for each of the 2 disks.
	if want := int64(102*mib + 2*64*mib); margin != want {
		t.Errorf("margin %d, want %d", margin, want)
	}
	if n, margin := activities.SpaceNeeded(nil); n != 0 || margin != 0 {
		t.Errorf("no disks: %d + %d", n, margin)
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 bytes", 512: "512 bytes", 1024: "1 KiB", 1536: "1.5 KiB", 120 << 20: "120 MiB",
		2254857830: "2.1 GiB", 40 << 20: "40 MiB", 3 << 40: "3 TiB",
	} {
		if got := activities.HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestSpaceMessage(t *testing.T) {
	in := activities.CheckSpaceInput{BackupID: "b1", VMName: "web01", Disks: []activities.SpaceDisk{
		{Key: 204, Mode: activities.ModeFull, Bytes: 2 << 30, Basis: activities.SpaceAllocated},
		{Key: 205, Mode: activities.ModeIncremental, Bytes: 40 << 20, Basis: activities.SpaceEstimated, Incrementals: 3},
		{Key: 206, Mode: activities.ModeIncremental, Basis: activities.SpaceEstimated},
	}}
	n, margin := activities.SpaceNeeded(in.Disks)
	msg := activities.SpaceMessage(in, activities.CheckSpaceResult{Repository: "/srv/cbtflow", FreeBytes: 120 << 20, NeededBytes: n, MarginBytes: margin})
	for _, want := range []string{
		"repository /srv/cbtflow has 120 MiB (125829120 bytes) free",
		"the backup of VM web01 needs about 2 GiB (" + strconv.FormatInt(n, 10) + " bytes: ",
		"disk 204: full, 2 GiB allocated", "disk 205: incremental, about 40 MiB changed, the most of its last 3 incremental(s)",
		"disk 206: incremental, changed bytes unknown until the CBT query",
		"plus a margin of 296 MiB (" + strconv.FormatInt(margin, 10) + " bytes: 5% + 64 MiB per disk)",
		"checked before the snapshot: no snapshot was taken",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("message lacks %q:\n%s", want, msg)
		}
	}
	in.AfterQuery = true
	in.Disks = []activities.SpaceDisk{{Key: 205, Mode: activities.ModeIncremental, Bytes: 40 << 20, Basis: activities.SpaceChanged}}
	msg = activities.SpaceMessage(in, activities.CheckSpaceResult{Repository: "/srv/cbtflow", FreeBytes: 10 << 20, NeededBytes: 40 << 20, MarginBytes: 66 << 20})
	for _, want := range []string{"needs 40 MiB (", "disk 205: incremental, 40 MiB changed)", "checked after the CBT query"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message after the query lacks %q:\n%s", want, msg)
		}
	}
}

// CheckSpace against a real file system: what fits passes, what does not
// fails at once with RepositoryFull, its message naming the repository,
// the need and the free space.
func TestCheckSpace(t *testing.T) {
	repo, err := repository.Open(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	tr := &activities.Transfer{Repo: repo}
	env := newActivityEnv(t, slog.New(slog.NewTextHandler(io.Discard, nil)), tr)
	var st unix.Statfs_t
	if err := unix.Statfs(repo.Root(), &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	small := activities.CheckSpaceInput{BackupID: "b1", VMName: "vm0", Disks: []activities.SpaceDisk{
		{Key: 204, Mode: activities.ModeFull, Bytes: 1 << 20, Basis: activities.SpaceAllocated}}}
	if free > 1<<30 {
		r := mustExecute[activities.CheckSpaceResult](t, env, tr.CheckSpace, small)
		if r.Repository != repo.Root() || r.FreeBytes <= 0 || r.NeededBytes != 1<<20 || r.MarginBytes != 52429+64<<20 {
			t.Errorf("result %+v", r)
		}
	}
	big := activities.CheckSpaceInput{BackupID: "b1", VMName: "vm0", Disks: []activities.SpaceDisk{
		{Key: 204, Mode: activities.ModeFull, Bytes: free + 1, Basis: activities.SpaceAllocated}}}
	_, err = execute[activities.CheckSpaceResult](t, env, tr.CheckSpace, big)
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeRepositoryFull || !app.NonRetryable() {
		t.Fatalf("error %v, want a non-retryable %s", err, activities.ErrTypeRepositoryFull)
	}
	for _, want := range []string{"repository " + repo.Root() + " has ", " bytes) free", "the backup of VM vm0 needs about ",
		"disk 204: full, ", " allocated"} {
		if !strings.Contains(app.Message(), want) {
			t.Errorf("message lacks %q: %s", want, app.Message())
		}
	}
	var details activities.CheckSpaceResult
	if err := app.Details(&details); err != nil || details.NeededBytes != free+1 || details.Repository != repo.Root() {
		t.Errorf("details %+v (%v)", details, err)
	}
}

// PrepareVM reports what each of the lab's disks holds: its image's
// allocated bytes.
func TestPrepareVMAllocatedBytes(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	r := mustExecute[activities.ResolveVMResult](t, env, f.vs.ResolveVM, activities.ResolveVMInput{Profile: profileLab, VM: lab.SecondDiskVM})
	labDisks, err := f.lab.Disks(lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.lab.WriteDisk(lab.SecondDiskVM, labDisks[1].Key, 4<<20, bytes.NewReader(bytes.Repeat([]byte{9}, 5<<20))); err != nil {
		t.Fatal(err)
	}
	p := mustExecute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, activities.PrepareVMInput{Profile: profileLab, VMUUID: r.VMUUID})
	if len(p.Disks) != 2 {
		t.Fatalf("disks %+v", p.Disks)
	}
	for _, d := range p.Disks {
		if d.AllocatedUnknown || d.AllocatedBytes > d.Capacity {
			t.Errorf("disk %+v: allocation unknown or above the capacity", d)
		}
	}
	if n := p.Disks[1].AllocatedBytes; n < 5<<20 || n > 5<<20+lab.BlockSize {
		t.Errorf("disk %d allocated %d bytes, want the 5 MiB written", p.Disks[1].Key, n)
	}

	// Skipped, the allocation is left out, and AllocatedBytes reads it for
	// the disks asked: the same figures.
	skipped := mustExecute[activities.PrepareVMResult](t, env, f.vs.PrepareVM, activities.PrepareVMInput{Profile: profileLab, VMUUID: r.VMUUID, SkipAllocation: true})
	for _, d := range skipped.Disks {
		if d.AllocatedBytes != 0 || d.AllocatedUnknown {
			t.Errorf("disk %+v: PrepareVM read the allocation it was told to skip", d)
		}
	}
	in := activities.AllocatedBytesInput{Profile: profileLab, VMRef: p.VMRef, VMName: p.VMName,
		Disks: []activities.AllocationDisk{{Key: p.Disks[1].Key, Capacity: p.Disks[1].Capacity}, {Key: 4242, Capacity: 1 << 30}}}
	a := mustExecute[activities.AllocatedBytesResult](t, env, f.vs.AllocatedBytes, in)
	want := []activities.AllocationDisk{
		{Key: p.Disks[1].Key, Capacity: p.Disks[1].Capacity, AllocatedBytes: p.Disks[1].AllocatedBytes},
		{Key: 4242, Capacity: 1 << 30, AllocatedBytes: 1 << 30, AllocatedUnknown: true}, // not in the layout: its capacity
	}
	if !slices.Equal(a.Disks, want) {
		t.Errorf("AllocatedBytes = %+v, want %+v", a.Disks, want)
	}
	_, err = execute[activities.AllocatedBytesResult](t, env, f.vs.AllocatedBytes, activities.AllocatedBytesInput{Profile: profileLab, VMRef: p.VMRef})
	wantAppError(t, err, activities.ErrTypeInvalidInput, "at least one disk")
	in.VMRef = "vm-999999"
	_, err = execute[activities.AllocatedBytesResult](t, env, f.vs.AllocatedBytes, in)
	wantAppError(t, err, activities.ErrTypeVMNotFound, "vm-999999")
}
