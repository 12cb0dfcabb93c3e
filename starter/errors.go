package main

// exitError ends starter with a specific exit code. quiet means the error
// was already reported on stdout (e.g. in JSON) and only goes to stderr
// once.
type exitError struct {
	code  int
	err   error
	quiet bool
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

// usageError is a bad command line: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }
