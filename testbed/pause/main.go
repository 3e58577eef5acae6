// Command pause is the test bed's pod sandbox: it holds the pod's namespaces open until
// the runtime stops it with SIGTERM or SIGINT, and exits 0 then.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for received := range signals {
		if received != syscall.SIGCHLD {
			return
		}
		// In a pod that shares its PID namespace the sandbox is PID 1 and must reap
		// orphaned processes, as init does.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
