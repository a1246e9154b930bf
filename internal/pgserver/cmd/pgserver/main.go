// Command pgserver starts and stops a throwaway PostgreSQL server for
// scripts/test.sh:
//
//	pgserver start DIR   start a server on a free loopback port with its files in DIR (created); print its URL
//	pgserver stop DIR    stop that server and remove DIR
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/profullstack/keybroker/internal/pgserver"
)

func main() {
	if len(os.Args) != 3 || (os.Args[1] != "start" && os.Args[1] != "stop") {
		fmt.Fprintln(os.Stderr, "usage: pgserver start|stop DIR")
		os.Exit(2)
	}
	dir := os.Args[2]
	if os.Args[1] == "stop" {
		if err := pgserver.StopDir(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	s, err := pgserver.Start(context.Background(), pgserver.Options{Dir: dir, TCP: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(s.URL)
}
