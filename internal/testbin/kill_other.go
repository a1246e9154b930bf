//go:build !linux

package testbin

import "os/exec"

// KillWithParent does nothing: only Linux can tie a child's life to its
// parent's.
func KillWithParent(*exec.Cmd) {}
