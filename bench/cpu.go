package bench

import "github.com/profullstack/keybroker/internal/cpumeter"

// CPUMeter is cpumeter.Meter: this process's CPU time and the PostgreSQL
// server's.
type CPUMeter = cpumeter.Meter

// PostmasterPID reads the pid from a data directory's postmaster.pid.
func PostmasterPID(dataDir string) (int, error) { return cpumeter.PostmasterPID(dataDir) }
