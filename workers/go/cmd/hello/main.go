// A net/http server as an rcluster-lb worker in any mode (see package rcluster): answers
// "pid N" and shuts down gracefully on SIGTERM.
package main

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"rcluster.invalid/worker/rcluster"
)

func main() {
	ls, err := rcluster.Listeners()
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "pid %d\n", os.Getpid())
	})}
	for _, l := range ls {
		go srv.Serve(l)
	}
	rcluster.Ready()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	srv.Shutdown(context.Background())
}
