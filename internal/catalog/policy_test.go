package catalog

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/retention"
)

// seedVMs records one backup of each VM, which is what puts a VM into
// the catalog.
func seedVMs(t *testing.T, c *Catalog, vms ...VM) {
	t.Helper()
	for i, v := range vms {
		b := Backup{ID: "seed-" + v.Profile + "-" + v.UUID, Profile: v.Profile, VMUUID: v.UUID, VMName: v.Name, Mode: "auto"}
		if err := c.Begin(context.Background(), b); err != nil {
			t.Fatalf("seed VM %d: %v", i, err)
		}
	}
}

func effective(t *testing.T, c *Catalog, profile, uuid string) (retention.Policy, PolicySource) {
	t.Helper()
	p, src, err := c.EffectivePolicy(context.Background(), profile, uuid)
	if err != nil {
		t.Fatalf("effective policy of %s/%s: %v", profile, uuid, err)
	}
	return p, src
}

func TestPolicyPrecedence(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	a := VM{VMRef{"lab", "uuid-a"}, "vm-a"}
	b := VM{VMRef{"lab", "uuid-b"}, "vm-b"}
	seedVMs(t, c, a, b)

	// Nothing stored: every VM keeps everything, and its chain bound is
	// still the default.
	if ps, err := c.Policies(ctx); err != nil || len(ps) != 0 {
		t.Fatalf("policies of a new catalog: %v %v", ps, err)
	}
	if p, src := effective(t, c, "lab", "uuid-a"); src != PolicyNone || p != (retention.Policy{}) || p.Chain() != retention.DefaultMaxChain {
		t.Fatalf("without policies: %+v %s", p, src)
	}

	def := retention.Policy{KeepDaily: 7, KeepWeekly: 4}
	if err := c.SetPolicy(ctx, VMRef{}, def); err != nil {
		t.Fatal(err)
	}
	own := retention.Policy{KeepLast: 2, MaxChain: 10}
	if err := c.SetPolicy(ctx, a.VMRef, own); err != nil {
		t.Fatal(err)
	}
	if p, src := effective(t, c, "lab", "uuid-a"); src != PolicyOwn || p != own {
		t.Errorf("VM with its own policy: %+v %s, want %+v vm", p, src, own)
	}
	if p, src := effective(t, c, "lab", "uuid-b"); src != PolicyDefault || p != def {
		t.Errorf("VM without its own: %+v %s, want %+v default", p, src, def)
	}
	// The same VM under another profile is another VM of the catalog.
	if _, src := effective(t, c, "other", "uuid-a"); src != PolicyDefault {
		t.Errorf("VM a under another profile: %s, want default", src)
	}

	// Set replaces the whole policy, not single rules.
	own2 := retention.Policy{KeepMonthly: 3}
	if err := c.SetPolicy(ctx, a.VMRef, own2); err != nil {
		t.Fatal(err)
	}
	if p, _ := effective(t, c, "lab", "uuid-a"); p != own2 {
		t.Errorf("after a second set: %+v, want %+v", p, own2)
	}
	def2 := retention.Policy{KeepYearly: 5}
	if err := c.SetPolicy(ctx, VMRef{}, def2); err != nil {
		t.Fatal(err)
	}

	ps, err := c.Policies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || ps[0].VM != (VM{}) || ps[0].Policy != def2 || ps[1].VM != a || ps[1].Policy != own2 {
		t.Fatalf("policies: %+v", ps)
	}
	if ps[0].UpdatedAt.IsZero() || ps[1].UpdatedAt.IsZero() {
		t.Errorf("policies without updated_at: %+v", ps)
	}

	// Clearing the VM's own falls back to the default, clearing that to
	// nothing; a second clear finds nothing.
	for _, step := range []struct {
		ref  VMRef
		want PolicySource
	}{{a.VMRef, PolicyDefault}, {VMRef{}, PolicyNone}} {
		ok, err := c.ClearPolicy(ctx, step.ref)
		if err != nil || !ok {
			t.Fatalf("clear %s: %v %v", step.ref, ok, err)
		}
		if _, src := effective(t, c, "lab", "uuid-a"); src != step.want {
			t.Errorf("after clearing %s: %s, want %s", step.ref, src, step.want)
		}
		if ok, err := c.ClearPolicy(ctx, step.ref); err != nil || ok {
			t.Errorf("second clear of %s: %v %v, want false", step.ref, ok, err)
		}
	}
	if ps, err := c.Policies(ctx); err != nil || len(ps) != 0 {
		t.Errorf("policies after clearing all: %v %v", ps, err)
	}
}

func TestPolicyOrder(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	vms := []VM{{VMRef{"p2", "u3"}, "beta"}, {VMRef{"p1", "u2"}, "beta"}, {VMRef{"p1", "u1"}, "alpha"}}
	seedVMs(t, c, vms...)
	for _, v := range vms {
		if err := c.SetPolicy(ctx, v.VMRef, retention.Policy{KeepLast: 1}); err != nil {
			t.Fatal(err)
		}
	}
	// The default is stored last and still comes first.
	if err := c.SetPolicy(ctx, VMRef{}, retention.Policy{KeepLast: 9}); err != nil {
		t.Fatal(err)
	}
	ps, err := c.Policies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range ps {
		got = append(got, p.VM.Name+"/"+p.VM.Profile+"/"+p.VM.UUID)
	}
	if want := []string{"//", "alpha/p1/u1", "beta/p1/u2", "beta/p2/u3"}; !slices.Equal(got, want) {
		t.Errorf("order %q, want %q", got, want)
	}
}

func TestPolicyValidation(t *testing.T) {
	c, url := open(t)
	ctx := context.Background()
	a := VM{VMRef{"lab", "uuid-a"}, "vm-a"}
	seedVMs(t, c, a)

	for _, ref := range []VMRef{{}, a.VMRef} {
		if err := c.SetPolicy(ctx, ref, retention.Policy{MaxChain: 5}); !errors.Is(err, retention.ErrNoRule) {
			t.Errorf("%s: a policy without a rule: %v, want ErrNoRule", ref, err)
		}
		err := c.SetPolicy(ctx, ref, retention.Policy{KeepLast: 1, KeepDaily: -1})
		if err == nil || !strings.Contains(err.Error(), "--keep-daily -1: must be 0 or more") {
			t.Errorf("%s: a negative count: %v", ref, err)
		}
		if err := c.SetPolicy(ctx, ref, retention.Policy{KeepLast: 1 << 40}); err == nil || !strings.Contains(err.Error(), "is more than 2147483647") {
			t.Errorf("%s: a count beyond integer: %v", ref, err)
		}
	}
	err := c.SetPolicy(ctx, VMRef{"lab", "no-such-uuid"}, retention.Policy{KeepLast: 1})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("a VM not in the catalog: %v, want ErrNotFound", err)
	}
	if ps, err := c.Policies(ctx); err != nil || len(ps) != 0 {
		t.Errorf("refused policies were stored: %v %v", ps, err)
	}

	// The table itself refuses what Validate does, and a second default.
	conn := rawConn(t, url)
	if err := c.SetPolicy(ctx, VMRef{}, retention.Policy{KeepLast: 1}); err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		`INSERT INTO retention_policies (vm_id, keep_last) VALUES (NULL, 3)`,
		`INSERT INTO retention_policies (vm_id, keep_last) SELECT id, -1 FROM vms`,
		`INSERT INTO retention_policies (vm_id, max_chain) SELECT id, 3 FROM vms`,
		`INSERT INTO retention_policies (vm_id, keep_last) VALUES (424242, 1)`,
	} {
		if _, err := conn.Exec(ctx, sql); err == nil {
			t.Errorf("the table took %s", sql)
		}
	}
}

func TestFindVMs(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	// Two VMs named alike, and one VM backed up under two profiles.
	seedVMs(t, c,
		VM{VMRef{"lab", "uuid-1"}, "web"},
		VM{VMRef{"lab", "uuid-2"}, "web"},
		VM{VMRef{"lab", "uuid-3"}, "db"},
		VM{VMRef{"lab2", "uuid-3"}, "db"},
	)
	for _, tc := range []struct {
		name, profile string
		want          []string
	}{
		{"web", "", []string{"lab/uuid-1", "lab/uuid-2"}},
		{"uuid-2", "", []string{"lab/uuid-2"}},
		{"db", "", []string{"lab/uuid-3", "lab2/uuid-3"}},
		{"uuid-3", "lab2", []string{"lab2/uuid-3"}},
		{"web", "lab2", nil},
		{"nope", "", nil},
		{"", "", []string{"lab/uuid-3", "lab2/uuid-3", "lab/uuid-1", "lab/uuid-2"}},
		{"", "lab2", []string{"lab2/uuid-3"}},
	} {
		vms, err := c.FindVMs(ctx, tc.name, tc.profile)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, v := range vms {
			got = append(got, v.Profile+"/"+v.UUID)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("FindVMs(%q, %q) = %q, want %q", tc.name, tc.profile, got, tc.want)
		}
	}
}

func rawConn(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}
