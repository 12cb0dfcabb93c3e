package catalog

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/cbtflow/cbtflow/internal/retention"
)

// VMRef names one VM of the catalog: a VM is recorded per vCenter profile
// and instance UUID. The zero VMRef names no VM: it stands for the default
// policy of all VMs.
type VMRef struct {
	Profile string
	UUID    string // instance UUID
}

// IsDefault reports whether r is the zero VMRef, the default policy's.
func (r VMRef) IsDefault() bool { return r == VMRef{} }

func (r VMRef) String() string {
	if r.IsDefault() {
		return "the default (all VMs)"
	}
	return fmt.Sprintf("VM %s (profile %s)", r.UUID, r.Profile)
}

// VM is a VM the catalog has recorded a backup of.
type VM struct {
	VMRef
	Name string // the name at its latest backup
}

// PolicySource says where a VM's effective policy comes from.
type PolicySource string

// The sources of an effective policy.
const (
	PolicyOwn     PolicySource = "vm"      // the VM's own policy
	PolicyDefault PolicySource = "default" // the default for all VMs
	PolicyNone    PolicySource = "none"    // neither: the VM keeps everything
)

// PolicyEntry is one stored retention policy.
type PolicyEntry struct {
	VM        VM // the zero VM for the default policy
	Policy    retention.Policy
	UpdatedAt time.Time
}

// FindVMs returns the VMs of the catalog that nameOrUUID names, by name or
// by instance UUID, as List matches them ("" matches every VM); a profile
// other than "" keeps only the VMs recorded under it. Sorted by name,
// profile and UUID. None is not an error: the result is empty.
func (c *Catalog) FindVMs(ctx context.Context, nameOrUUID, profile string) ([]VM, error) {
	rows, err := c.pool.Query(ctx, `SELECT v.profile, v.instance_uuid, v.name FROM vms v
		WHERE ($1 = '' OR v.name = $1 OR v.instance_uuid = $1) AND ($2 = '' OR v.profile = $2)
		ORDER BY v.name, v.profile, v.instance_uuid`, nameOrUUID, profile)
	if err != nil {
		return nil, fmt.Errorf("catalog: find VMs: %w", err)
	}
	vms, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (VM, error) {
		var v VM
		return v, r.Scan(&v.Profile, &v.UUID, &v.Name)
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: find VMs: %w", err)
	}
	return vms, nil
}

// SetPolicy stores p as the policy of vm, or as the default of all VMs
// when vm is the zero VMRef, replacing the one it had. p must pass
// Validate. A VM the catalog does not know is ErrNotFound.
func (c *Catalog) SetPolicy(ctx context.Context, vm VMRef, p retention.Policy) error {
	if err := p.Validate(); err != nil {
		return fmt.Errorf("catalog: policy of %s: %w", vm, err)
	}
	for _, n := range []int{p.KeepLast, p.KeepDaily, p.KeepWeekly, p.KeepMonthly, p.KeepYearly, p.MaxChain} {
		if n > math.MaxInt32 {
			return fmt.Errorf("catalog: policy of %s: %d is more than %d", vm, n, math.MaxInt32)
		}
	}
	const set = `DO UPDATE SET keep_last = EXCLUDED.keep_last, keep_daily = EXCLUDED.keep_daily,
		keep_weekly = EXCLUDED.keep_weekly, keep_monthly = EXCLUDED.keep_monthly,
		keep_yearly = EXCLUDED.keep_yearly, max_chain = EXCLUDED.max_chain, updated_at = now()`
	args := []any{p.KeepLast, p.KeepDaily, p.KeepWeekly, p.KeepMonthly, p.KeepYearly, p.MaxChain}
	if vm.IsDefault() {
		_, err := c.pool.Exec(ctx, `INSERT INTO retention_policies
			(vm_id, keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly, max_chain)
			VALUES (NULL, $1, $2, $3, $4, $5, $6)
			ON CONFLICT ((vm_id IS NULL)) WHERE vm_id IS NULL `+set, args...)
		if err != nil {
			return fmt.Errorf("catalog: policy of %s: %w", vm, err)
		}
		return nil
	}
	tag, err := c.pool.Exec(ctx, `INSERT INTO retention_policies
		(vm_id, keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly, max_chain)
		SELECT v.id, $1, $2, $3, $4, $5, $6 FROM vms v WHERE v.profile = $7 AND v.instance_uuid = $8
		ON CONFLICT (vm_id) `+set, append(args, vm.Profile, vm.UUID)...)
	if err != nil {
		return fmt.Errorf("catalog: policy of %s: %w", vm, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("catalog: policy of %s: %w", vm, ErrNotFound)
	}
	return nil
}

// ClearPolicy removes the policy of vm, or the default when vm is the
// zero VMRef, and reports whether there was one. The VM then follows the
// default, or keeps everything when there is none.
func (c *Catalog) ClearPolicy(ctx context.Context, vm VMRef) (bool, error) {
	var tag pgconn.CommandTag
	var err error
	if vm.IsDefault() {
		tag, err = c.pool.Exec(ctx, `DELETE FROM retention_policies WHERE vm_id IS NULL`)
	} else {
		tag, err = c.pool.Exec(ctx, `DELETE FROM retention_policies p USING vms v
			WHERE p.vm_id = v.id AND v.profile = $1 AND v.instance_uuid = $2`, vm.Profile, vm.UUID)
	}
	if err != nil {
		return false, fmt.Errorf("catalog: clear policy of %s: %w", vm, err)
	}
	return tag.RowsAffected() > 0, nil
}

const policyColumns = `p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly, p.max_chain`

func policyDest(p *retention.Policy) []any {
	return []any{&p.KeepLast, &p.KeepDaily, &p.KeepWeekly, &p.KeepMonthly, &p.KeepYearly, &p.MaxChain}
}

// Policies returns every stored policy: the default first (when there is
// one), then the VMs' own by VM name, profile and UUID.
func (c *Catalog) Policies(ctx context.Context) ([]PolicyEntry, error) {
	rows, err := c.pool.Query(ctx, `SELECT coalesce(v.profile, ''), coalesce(v.instance_uuid, ''), coalesce(v.name, ''),
		`+policyColumns+`, p.updated_at
		FROM retention_policies p LEFT JOIN vms v ON v.id = p.vm_id
		ORDER BY p.vm_id IS NOT NULL, v.name, v.profile, v.instance_uuid`)
	if err != nil {
		return nil, fmt.Errorf("catalog: policies: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (PolicyEntry, error) {
		var e PolicyEntry
		dst := append([]any{&e.VM.Profile, &e.VM.UUID, &e.VM.Name}, policyDest(&e.Policy)...)
		return e, r.Scan(append(dst, &e.UpdatedAt)...)
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: policies: %w", err)
	}
	return out, nil
}

// EffectivePolicy returns the policy that applies to a VM and where it
// comes from: the VM's own, else the default, else none (PolicyNone,
// with the zero Policy: keep everything; its Chain() is still
// retention.DefaultMaxChain). A VM the catalog does not know gets the
// default too.
func (c *Catalog) EffectivePolicy(ctx context.Context, profile, vmUUID string) (retention.Policy, PolicySource, error) {
	var p retention.Policy
	var own bool
	err := c.pool.QueryRow(ctx, `SELECT p.vm_id IS NOT NULL, `+policyColumns+`
		FROM retention_policies p LEFT JOIN vms v ON v.id = p.vm_id
		WHERE p.vm_id IS NULL OR (v.profile = $1 AND v.instance_uuid = $2)
		ORDER BY p.vm_id IS NULL LIMIT 1`, profile, vmUUID).Scan(append([]any{&own}, policyDest(&p)...)...)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return retention.Policy{}, PolicyNone, nil
	case err != nil:
		return retention.Policy{}, "", fmt.Errorf("catalog: policy of VM %s (profile %s): %w", vmUUID, profile, err)
	case own:
		return p, PolicyOwn, nil
	default:
		return p, PolicyDefault, nil
	}
}
