package testbin

import (
	"os/exec"
	"syscall"
)

// KillWithParent has the kernel kill cmd's process if the process that
// started it dies first (a test binary that panics or times out), so no
// server or worker outlives its test.
func KillWithParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}
