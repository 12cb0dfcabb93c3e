package stack

// SetTemporalDBTmpfs makes the stacks started until restore is called put
// Temporal's database in dir instead of TemporalDBTmpfs.
func SetTemporalDBTmpfs(dir string) (restore func()) {
	old := temporalDBTmpfs
	temporalDBTmpfs = dir
	return func() { temporalDBTmpfs = old }
}

var MoveTemporalDB = moveTemporalDB

// HandOutNext makes the next free ports handed out ports, in order,
// taken or not.
func HandOutNext(ports ...int) {
	handedOut.Lock()
	defer handedOut.Unlock()
	handedOut.next = ports
}
