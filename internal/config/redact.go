package config

import (
	"net/url"
	"regexp"
	"strings"
)

// dsnSecretRE finds a secret of a keyword/value connection string
// (password=secret, sslpassword='a secret').
var dsnSecretRE = regexp.MustCompile(`(?i)((?:^|[\s])(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// secretParams are the query parameters of a PostgreSQL URL that hold a
// secret.
var secretParams = []string{"password", "sslpassword"}

// RedactDatabaseURL is the database URL (or keyword/value string) with
// any password (the user's, the client key's sslpassword) replaced by
// xxxxx, for help texts and logs; a URL too malformed to parse shows only
// its scheme.
func RedactDatabaseURL(s string) string {
	scheme, _, isURL := strings.Cut(s, "://")
	if !isURL {
		return dsnSecretRE.ReplaceAllString(s, "${1}xxxxx")
	}
	u, err := url.Parse(s)
	if err != nil {
		return scheme + "://(malformed URL)"
	}
	q := u.Query()
	changed := false
	for k := range q {
		for _, p := range secretParams {
			if strings.EqualFold(k, p) {
				q.Set(k, "xxxxx")
				changed = true
			}
		}
	}
	if changed {
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
