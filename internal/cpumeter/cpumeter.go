// Package cpumeter measures CPU time: this process's, and a PostgreSQL
// server's on the same machine (postmaster and backends). Benchmarks use
// it to report CPU per operation beside wall-clock rates, which a machine
// shared with other work makes noisy: on an otherwise idle machine a
// sequential client-server loop runs at about one operation per (client +
// server) CPU time.
package cpumeter

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Meter reads the CPU time used so far by this process and, when the
// PostgreSQL server runs on this machine and its postmaster's pid is
// known, by the server: postmaster and live backends to the nanosecond
// (/proc/<pid>/schedstat), exited backends to the clock tick.
type Meter struct {
	Postmaster int // 0: server time unknown
}

// clockTick is USER_HZ, the unit of /proc/<pid>/stat times on Linux.
const clockTick = 10 * time.Millisecond

// PostmasterPID reads the pid from a data directory's postmaster.pid.
func PostmasterPID(dataDir string) (int, error) {
	f, err := os.Open(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, fmt.Errorf("cpumeter: empty postmaster.pid")
	}
	return strconv.Atoi(strings.TrimSpace(sc.Text()))
}

// Sample returns the CPU time this process and the server have used.
func (m Meter) Sample() (client, server time.Duration) {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		client = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if m.Postmaster == 0 {
		return client, -1
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ppid, self, children, ok := procCPU(pid)
		switch {
		case !ok:
		case pid == m.Postmaster:
			server += schedTime(pid, self) + children // children: backends that exited
		case ppid == m.Postmaster:
			server += schedTime(pid, self)
		}
	}
	return client, server
}

// Process returns the CPU time process pid has used, all its threads (to
// the nanosecond from each thread's /proc/<pid>/task/<tid>/schedstat, or
// to the clock tick from /proc/<pid>/stat), plus its waited-for children's;
// -1 if it cannot be read. Sample's server time reads only each process's
// main thread, which is all a PostgreSQL process has; a Go program such as
// Vault runs on many.
func Process(pid int) time.Duration {
	_, self, children, ok := procCPU(pid)
	if !ok {
		return -1
	}
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return self + children
	}
	var threads time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + t.Name() + "/schedstat")
		if err != nil {
			return self + children // a thread ended meanwhile: the coarse total
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return self + children
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return self + children
		}
		threads += time.Duration(ns)
	}
	return threads + children
}

// procCPU parses /proc/<pid>/stat: parent pid, the process's user+system
// time, and that of its waited-for children.
func procCPU(pid int) (ppid int, self, children time.Duration, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, 0, false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, 0, false
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 15 {
		return 0, 0, 0, false
	}
	n := func(k int) int64 { v, _ := strconv.ParseInt(f[k-3], 10, 64); return v }
	ppid = int(n(4))
	self = time.Duration(n(14)+n(15)) * clockTick
	children = time.Duration(n(16)+n(17)) * clockTick
	return ppid, self, children, true
}

// schedTime returns the nanosecond CPU time of /proc/<pid>/schedstat, or
// ticks (the 10 ms-resolution /proc/<pid>/stat time) if it is missing.
func schedTime(pid int, ticks time.Duration) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/schedstat")
	if err != nil {
		return ticks
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return ticks
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return ticks
	}
	return time.Duration(ns)
}
