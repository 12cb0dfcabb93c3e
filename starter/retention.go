package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/retention"
)

func newRetentionCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "retention",
		Short: "retention policies of restore points (set, show, clear)",
		Long:  "Retention policies of restore points: which restore points of a VM a prune keeps.\n\n" + retentionRules,
	}
	cmd.AddCommand(newRetentionSetCmd(e), newRetentionShowCmd(e), newRetentionClearCmd(e))
	return cmd
}

const retentionRules = `The rules are restic's: keep-last N keeps the N newest restore points;
keep-daily, -weekly, -monthly and -yearly keep the newest restore point of
each of the last D days, W (ISO) weeks, M months, Y years that have one,
in the worker's local time zone. Every rule looks at all restore points on
its own, and a point kept by any rule is kept. A rule set to 0 is off.

A VM's own policy replaces the default (the two are not merged); a VM with
neither keeps everything.`

const profileLookupUsage = "only the VM backed up under this vCenter `profile` (when the name or UUID matches several)"

// retentionTarget is the VM (or the default) a set or clear names.
type retentionTarget struct {
	def     *bool
	profile *string
}

func (t *retentionTarget) register(fs *pflag.FlagSet, verb string) {
	t.def = fs.Bool("default", false, verb+" the default policy of all VMs without their own, instead of a VM's")
	t.profile = fs.String("profile", "", profileLookupUsage)
}

// check validates the command line: exactly one of VM and --default.
func (t *retentionTarget) check(cmd string, pos []string) error {
	switch {
	case len(pos) > 1:
		return fmt.Errorf("%s: give one VM or --default, not %d arguments", cmd, len(pos))
	case len(pos) == 1 && *t.def:
		return fmt.Errorf("%s: give a VM or --default, not both", cmd)
	case len(pos) == 0 && !*t.def:
		return fmt.Errorf("%s: give a VM (name or instance UUID) or --default for all VMs", cmd)
	case *t.def && *t.profile != "":
		return fmt.Errorf("%s: --profile selects a VM; the default policy has none", cmd)
	case len(pos) == 1 && pos[0] == "":
		return fmt.Errorf("%s: the VM is empty: give its name or instance UUID", cmd)
	}
	return nil
}

// resolve finds the one VM pos names, or the default (the zero VM).
func (t *retentionTarget) resolve(ctx context.Context, cat *catalog.Catalog, cmd string, pos []string) (catalog.VM, error) {
	if *t.def {
		return catalog.VM{}, nil
	}
	return findOneVM(ctx, cat, cmd, pos[0], *t.profile)
}

// findOneVM finds the VM of the catalog that name (a name or instance
// UUID) names, and fails with what to give instead when none or several
// match.
func findOneVM(ctx context.Context, cat *catalog.Catalog, cmd, name, profile string) (catalog.VM, error) {
	vms, err := cat.FindVMs(ctx, name, profile)
	if err != nil {
		return catalog.VM{}, err
	}
	switch len(vms) {
	case 0:
		return catalog.VM{}, fmt.Errorf("%s: %s: a policy is set on a VM cbtflow has backed up, or with --default for all VMs",
			cmd, notInCatalog(name, profile))
	case 1:
		return vms[0], nil
	}
	sameUUID := true
	for _, v := range vms {
		sameUUID = sameUUID && v.UUID == vms[0].UUID
	}
	hint := "give --profile or the instance UUID"
	if sameUUID {
		hint = "it was backed up under several profiles: give --profile"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %q names %d VMs in the catalog; %s:\n", cmd, name, len(vms), hint)
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, v := range vms {
		fmt.Fprintf(tw, "  %s\tprofile %s\tuuid %s\n", v.Name, v.Profile, v.UUID)
	}
	_ = tw.Flush()
	return catalog.VM{}, errors.New(strings.TrimSuffix(b.String(), "\n"))
}

func notInCatalog(name, profile string) string {
	if profile != "" {
		return fmt.Sprintf("VM %q has no restore points under profile %s in the catalog", name, profile)
	}
	return fmt.Sprintf("VM %q has no restore points in the catalog", name)
}

// label names a VM, or the default, in the commands' output.
func label(v catalog.VM) string {
	if v.IsDefault() {
		return "default"
	}
	return v.Name
}

// describe says what a VM's effective policy keeps.
func describe(p retention.Policy, src catalog.PolicySource) string {
	switch src {
	case catalog.PolicyOwn:
		return p.String() + " (its own policy)"
	case catalog.PolicyDefault:
		return p.String() + " (the default policy)"
	}
	return fmt.Sprintf("keeps everything: no policy of its own and no default (max-chain %d)", p.Chain())
}

func openCatalog(ctx context.Context, cfg *config.Config) (*catalog.Catalog, error) {
	return catalog.Open(ctx, cfg.DatabaseURL)
}

func newRetentionSetCmd(e *env) *cobra.Command {
	var cfg config.Config
	var p retention.Policy
	var target retentionTarget
	cmd := &cobra.Command{
		Use:   "set (VM | --default) [--keep-last N] [--keep-daily D] [--keep-weekly W] [--keep-monthly M] [--keep-yearly Y] [--max-chain N]",
		Short: "set a VM's policy or the default",
		Long: `Store the retention policy of a VM of the catalog (a name or instance
UUID), or with --default the policy of every VM without its own. It
replaces the policy there was: a rule not given is off. At least one keep
rule must be greater than 0.

` + retentionRules,
		Example: `  starter retention set --default --keep-daily 7 --keep-weekly 4 --keep-monthly 12
  starter retention set DC0_H0_VM0 --keep-last 2`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return retentionSet(cmd.Context(), e, &cfg, args, p, target)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog)
	fs := cmd.Flags()
	fs.IntVar(&p.KeepLast, "keep-last", 0, "keep the `N` newest restore points")
	fs.IntVar(&p.KeepDaily, "keep-daily", 0, "keep the newest restore point of each of the last `D` days that have one")
	fs.IntVar(&p.KeepWeekly, "keep-weekly", 0, "keep the newest restore point of each of the last `W` ISO weeks that have one")
	fs.IntVar(&p.KeepMonthly, "keep-monthly", 0, "keep the newest restore point of each of the last `M` months that have one")
	fs.IntVar(&p.KeepYearly, "keep-yearly", 0, "keep the newest restore point of each of the last `Y` years that have one")
	fs.IntVar(&p.MaxChain, "max-chain", 0, fmt.Sprintf("when a disk's chain holds `N` images, its next backup is a full one (0 means %d)", retention.DefaultMaxChain))
	target.register(fs, "set")
	return cmd
}

func retentionSet(ctx context.Context, e *env, cfg *config.Config, pos []string, p retention.Policy, target retentionTarget) error {
	if err := target.check("retention set", pos); err != nil {
		return usageError{err}
	}
	if err := p.Validate(); err != nil {
		return usageError{fmt.Errorf("retention set: %w", err)}
	}
	cat, err := openCatalog(ctx, cfg)
	if err != nil {
		return err
	}
	defer cat.Close()
	vm, err := target.resolve(ctx, cat, "retention set", pos)
	if err != nil {
		return err
	}
	if err := cat.SetPolicy(ctx, vm.VMRef, p); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: %s\n", label(vm), p)
	return nil
}

func newRetentionClearCmd(e *env) *cobra.Command {
	var cfg config.Config
	var target retentionTarget
	cmd := &cobra.Command{
		Use:   "clear (VM | --default)",
		Short: "remove a VM's policy or the default",
		Long: `Remove the retention policy of a VM of the catalog (a name or instance
UUID): the VM then follows the default, or keeps everything when there is
none. With --default, remove the default: every VM without a policy of its
own then keeps everything.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return retentionClear(cmd.Context(), e, &cfg, args, target)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog)
	target.register(cmd.Flags(), "remove")
	return cmd
}

func retentionClear(ctx context.Context, e *env, cfg *config.Config, pos []string, target retentionTarget) error {
	if err := target.check("retention clear", pos); err != nil {
		return usageError{err}
	}
	cat, err := openCatalog(ctx, cfg)
	if err != nil {
		return err
	}
	defer cat.Close()
	vm, err := target.resolve(ctx, cat, "retention clear", pos)
	if err != nil {
		return err
	}
	removed, err := cat.ClearPolicy(ctx, vm.VMRef)
	if err != nil {
		return err
	}
	if vm.IsDefault() {
		if removed {
			fmt.Fprintln(e.stdout, "default: removed; a VM without a policy of its own now keeps everything")
		} else {
			fmt.Fprintln(e.stdout, "default: there was none; a VM without a policy of its own keeps everything")
		}
		return nil
	}
	p, src, err := cat.EffectivePolicy(ctx, vm.Profile, vm.UUID)
	if err != nil {
		return err
	}
	what := "policy removed"
	if !removed {
		what = "had no policy of its own"
	}
	now := "the default applies: " + p.String()
	switch src {
	case catalog.PolicyOwn: // set again meanwhile
		now = "it has its own policy again: " + p.String()
	case catalog.PolicyNone:
		now = fmt.Sprintf("it keeps everything (no default policy; max-chain %d)", p.Chain())
	}
	fmt.Fprintf(e.stdout, "%s: %s; %s\n", label(vm), what, now)
	return nil
}

// The JSON of `retention show`: the default policy (null when there is
// none) and every VM shown, each with the policy that applies to it and
// where that comes from.
type retentionShowOutput struct {
	Default *policyOutput    `json:"default"`
	VMs     []vmPolicyOutput `json:"vms"`
}

type vmPolicyOutput struct {
	VM      string `json:"vm"`
	VMUUID  string `json:"vm_uuid"`
	Profile string `json:"profile"`
	// Source is "vm" (its own policy), "default" or "none" (it keeps
	// everything; Policy is null and its chains are bounded by
	// retention.DefaultMaxChain).
	Source string        `json:"source"`
	Policy *policyOutput `json:"policy"`
}

type policyOutput struct {
	KeepLast    int `json:"keep_last"`
	KeepDaily   int `json:"keep_daily"`
	KeepWeekly  int `json:"keep_weekly"`
	KeepMonthly int `json:"keep_monthly"`
	KeepYearly  int `json:"keep_yearly"`
	MaxChain    int `json:"max_chain"` // the bound that applies: never 0
}

func policyJSON(p retention.Policy) *policyOutput {
	return &policyOutput{KeepLast: p.KeepLast, KeepDaily: p.KeepDaily, KeepWeekly: p.KeepWeekly,
		KeepMonthly: p.KeepMonthly, KeepYearly: p.KeepYearly, MaxChain: p.Chain()}
}

func newRetentionShowCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	var profile string
	cmd := &cobra.Command{
		Use:   "show [VM]",
		Short: "show the policies and what each VM keeps",
		Long: fmt.Sprintf(`Without VM: the default policy and every VM of the catalog with the policy
that applies to it. With VM (a name or instance UUID): that VM's policy and
where it comes from: its own, the default, or none (it keeps everything).

--json prints one object: {"default": POLICY or null, "vms": [{"vm",
"vm_uuid", "profile", "source": "vm"|"default"|"none", "policy": POLICY or
null}]}, a POLICY being {"keep_last", "keep_daily", "keep_weekly",
"keep_monthly", "keep_yearly", "max_chain"} (max_chain as it applies,
%d when not set; a VM whose source is "none" has that bound too).`, retention.DefaultMaxChain),
		Args: maxArgs(1, "one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return retentionShow(cmd.Context(), e, &cfg, args, profile, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	cmd.Flags().StringVar(&profile, "profile", "", "only the VMs backed up under this vCenter `profile`")
	return cmd
}

func retentionShow(ctx context.Context, e *env, cfg *config.Config, pos []string, profile string, asJSON bool) error {
	var name string
	if len(pos) == 1 {
		if name = pos[0]; name == "" {
			return usageError{errors.New("retention show: the VM is empty: give its name or instance UUID, or none for every VM")}
		}
	}
	cat, err := openCatalog(ctx, cfg)
	if err != nil {
		return err
	}
	defer cat.Close()
	policies, err := cat.Policies(ctx)
	if err != nil {
		return err
	}
	out := retentionShowOutput{VMs: []vmPolicyOutput{}}
	if len(policies) > 0 && policies[0].VM.IsDefault() {
		out.Default = policyJSON(policies[0].Policy)
	}
	vms, err := cat.FindVMs(ctx, name, profile)
	if err != nil {
		return err
	}
	if name != "" && len(vms) == 0 {
		return fmt.Errorf("retention show: %s", notInCatalog(name, profile))
	}
	type shown struct {
		vm  catalog.VM
		p   retention.Policy
		src catalog.PolicySource
	}
	var rows []shown
	for _, v := range vms {
		p, src, err := cat.EffectivePolicy(ctx, v.Profile, v.UUID)
		if err != nil {
			return err
		}
		rows = append(rows, shown{v, p, src})
		vo := vmPolicyOutput{VM: v.Name, VMUUID: v.UUID, Profile: v.Profile, Source: string(src)}
		if src != catalog.PolicyNone {
			vo.Policy = policyJSON(p)
		}
		out.VMs = append(out.VMs, vo)
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	if name != "" {
		for _, r := range rows {
			fmt.Fprintf(e.stdout, "%s (profile %s, uuid %s): %s\n", r.vm.Name, r.vm.Profile, r.vm.UUID, describe(r.p, r.src))
		}
		return nil
	}
	if out.Default != nil {
		fmt.Fprintf(e.stdout, "default: %s\n", policies[0].Policy)
	} else {
		fmt.Fprintln(e.stdout, "default: none: a VM without a policy of its own keeps everything")
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tPROFILE\tUUID\tSOURCE\tPOLICY")
	for _, r := range rows {
		policy := r.p.String()
		if r.src == catalog.PolicyNone {
			policy = fmt.Sprintf("keeps everything (max-chain %d)", r.p.Chain())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.vm.Name, r.vm.Profile, r.vm.UUID, r.src, policy)
	}
	return tw.Flush()
}
