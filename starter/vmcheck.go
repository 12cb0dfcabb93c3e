package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// vmCheckTimeout bounds the look-up of a VM in vCenter.
const vmCheckTimeout = 30 * time.Second

// checkVMExists makes sure vm names a VM before a schedule backs it up.
//
// It resolves vm the way a backup's ResolveVM does (name, inventory path
// or moref; under profile, else the default profile) in the vCenter
// itself when the vCenter profiles file and its password file are
// readable from here (the worker's host: make dev, the compose worker
// container). Elsewhere the vCenter is out of the starter's reach (only
// the worker reads the profiles): then the VM must be in the catalog,
// known from an earlier backup under that profile.
//
// Temporal has no workflow that only resolves a VM (Backup resolves and
// then backs up): with one, the check would run through the worker
// everywhere.
func checkVMExists(ctx context.Context, e *env, cfg *config.Config, vm, profile string) error {
	found, why, err := resolveInVCenter(ctx, e, cfg, vm, profile)
	if err != nil {
		return err
	}
	if found {
		return nil
	}
	cat, err := catalog.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("cannot check VM %q: the vCenter is out of reach from here (%s), and the catalog: %w; give --no-check to create the schedule unchecked", vm, why, err)
	}
	defer cat.Close()
	vms, err := cat.FindVMs(ctx, vm, profile)
	if err != nil {
		return fmt.Errorf("cannot check VM %q: %w", vm, err)
	}
	if len(vms) == 0 {
		return fmt.Errorf("VM %q is unknown: the vCenter is out of reach from here (%s) and the catalog has no backup of a VM of that name or UUID%s; back it up once (starter backup), or give --no-check", vm, why, underProfile(profile))
	}
	e.log.Info("VM known to the catalog (the vCenter is out of reach from here)", "vm", vm, "uuid", vms[0].UUID, "profile", vms[0].Profile, "why", why)
	return nil
}

func underProfile(p string) string {
	if p == "" {
		return ""
	}
	return " under profile " + p
}

// resolveInVCenter looks vm up in the vCenter of profile. found false
// with a nil error: the vCenter cannot be asked from here, and why says
// why; an error: the vCenter answered that there is no such VM, or that
// the name matches several.
func resolveInVCenter(ctx context.Context, e *env, cfg *config.Config, vm, profile string) (found bool, why string, err error) {
	profiles, err := vsphere.LoadProfiles(cfg.VCenters)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
		return false, fmt.Sprintf("no readable vCenter profiles file %s", cfg.VCenters), nil
	}
	if err != nil {
		return false, err.Error(), nil
	}
	s := vsphere.NewSessionsWithOptions(profiles, e.log.With("component", "vsphere"), vsphere.SessionOptions{DefaultProfile: config.Env("CBTFLOW_PROFILE", "")})
	defer s.Close(context.WithoutCancel(ctx))
	// The profiles file here may not be the worker's (nor its default
	// profile): a profile it lacks is no answer.
	name := profile
	if name == "" {
		if name, err = s.DefaultProfile(); err != nil {
			return false, err.Error(), nil
		}
	}
	if _, err := s.Profile(name); err != nil {
		return false, err.Error(), nil
	}
	ctx, cancel := context.WithTimeout(ctx, vmCheckTimeout)
	defer cancel()
	c, err := s.Client(ctx, name)
	if err != nil {
		// Not reachable, or its password is not ours to read: no answer.
		return false, err.Error(), nil
	}
	v, err := c.FindVM(ctx, vm)
	switch {
	case errors.Is(err, vsphere.ErrVMNotFound):
		return false, "", fmt.Errorf("VM %q not found in the vCenter of profile %s: %w", vm, name, err)
	case errors.Is(err, vsphere.ErrAmbiguousVM):
		return false, "", fmt.Errorf("VM %q: %w: give its inventory path or moref", vm, err)
	case err != nil:
		return false, err.Error(), nil
	}
	e.log.Info("VM found in vCenter", "vm", vm, "name", v.Name, "uuid", v.UUID, "profile", name)
	return true, "", nil
}
