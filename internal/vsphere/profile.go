package vsphere

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Source kinds of Profile.Source.
const (
	SourceVDDK = "vddk" // nbdkit's vddk plugin (production, the default)
	SourceLab  = "lab"  // the lab's frozen snapshot images (demo, tests)
)

// Profile is one vCenter an operator configured (the CBTFLOW_VCENTERS
// file). It never holds the password itself, only the file to read it from.
type Profile struct {
	Name         string `json:"-"`
	URL          string `json:"url"` // https://host/sdk
	User         string `json:"user"`
	PasswordFile string `json:"password_file"`
	// Thumbprint pins the server certificate: its SHA-1, colon-separated
	// hex as vSphere shows it. Upper-cased by LoadProfiles.
	Thumbprint string `json:"thumbprint,omitempty"`
	// Insecure skips certificate verification. Only when set explicitly
	// (the lab); never together with Thumbprint.
	Insecure   bool   `json:"insecure,omitempty"`
	Source     string `json:"source,omitempty"` // SourceVDDK (default) or SourceLab
	VDDKLibDir string `json:"vddk_libdir,omitempty"`
	Transports string `json:"vddk_transports,omitempty"` // e.g. "nbdssl:nbd"
}

// profilesFile is the layout of a CBTFLOW_VCENTERS file.
type profilesFile struct {
	Profiles map[string]Profile `json:"profiles"`
}

var (
	profileNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	thumbprintRE  = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){19}$`)
)

// LoadProfiles reads a file of vCenter profiles:
//
//	{"profiles": {"lab": {"url": "https://127.0.0.1:8989/sdk", "user": "...",
//	  "password_file": "lab.password", "thumbprint": "AB:CD:..."}}}
//
// Unknown fields are refused (a typo would otherwise silently disable a
// setting). A relative password_file is resolved against the file's
// directory. Every profile is validated (see Profile.Validate); the error
// names the file, the profile and the field.
func LoadProfiles(path string) (map[string]Profile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("vsphere: vCenter profiles: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f profilesFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("vsphere: vCenter profiles %s: %w", path, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("vsphere: vCenter profiles %s: trailing data after the JSON object", path)
	}
	if len(f.Profiles) == 0 {
		return nil, fmt.Errorf("vsphere: vCenter profiles %s: no profiles (want {\"profiles\": {\"NAME\": {...}}})", path)
	}
	dir := filepath.Dir(path)
	out := make(map[string]Profile, len(f.Profiles))
	names := make([]string, 0, len(f.Profiles))
	for name := range f.Profiles {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		p := f.Profiles[name]
		p.Name = name
		if p.PasswordFile != "" && !filepath.IsAbs(p.PasswordFile) {
			p.PasswordFile = filepath.Join(dir, p.PasswordFile)
		}
		p.Thumbprint = strings.ToUpper(strings.TrimSpace(p.Thumbprint))
		if err := p.Validate(); err != nil {
			return nil, fmt.Errorf("vsphere: vCenter profiles %s: %w", path, err)
		}
		out[name] = p
	}
	return out, nil
}

// Validate checks that the profile is complete: a name, an https URL with a
// host, a user, a password file, and either a thumbprint (SHA-1 colon hex)
// or an explicit insecure, and a known source. The error names the profile
// and the field.
func (p Profile) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("profile %q: %s: %s", p.Name, field, fmt.Sprintf(format, args...)))
	}
	if !profileNameRE.MatchString(p.Name) {
		bad("name", "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if p.URL == "" {
		bad("url", "missing (want https://HOST/sdk)")
	} else if u, err := url.Parse(p.URL); err != nil || u.Scheme != "https" || u.Host == "" {
		bad("url", "%q is not an https://HOST/sdk URL", p.URL)
	} else if u.User != nil {
		bad("url", "must not hold credentials (use user and password_file)")
	}
	if p.User == "" {
		bad("user", "missing")
	}
	if p.PasswordFile == "" {
		bad("password_file", "missing (the file that holds the password)")
	}
	switch {
	case p.Thumbprint != "" && p.Insecure:
		bad("thumbprint", "set either thumbprint or insecure, not both")
	case p.Thumbprint != "" && !thumbprintRE.MatchString(p.Thumbprint):
		bad("thumbprint", "%q is not a SHA-1 thumbprint (20 colon-separated hex bytes, AB:CD:...)", p.Thumbprint)
	case p.Thumbprint == "" && !p.Insecure:
		bad("thumbprint", "missing: pin the vCenter certificate's SHA-1 thumbprint, or set insecure (lab only)")
	}
	switch p.Source {
	case "", SourceVDDK, SourceLab:
	default:
		bad("source", "%q is not %q or %q", p.Source, SourceVDDK, SourceLab)
	}
	return errors.Join(errs...)
}
