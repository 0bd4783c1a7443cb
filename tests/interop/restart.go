package main

// derp-interop restart: Tailscale's client sees derpd's graceful shutdown. The
// clients log in and exchange a packet, the harness prints "READY", and the
// test then stops the server; every client must receive a Restarting message
// (derp.ServerRestartingMessage) within the advertised bounds, and then see its
// connection end.

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

func runRestart(args []string) {
	fs := flag.NewFlagSet("restart", flag.ExitOnError)
	serverURL := fs.String("url", "", "DERP URL of a plain-HTTP server, e.g. http://127.0.0.1:3340/derp")
	nClients := fs.Int("clients", 3, "number of DERP clients")
	maxReconnectIn := fs.Duration("max-reconnect-in", 2*time.Second, "largest ReconnectIn accepted (exclusive)")
	tryFor := fs.Duration("try-for", 5*time.Second, "expected TryFor")
	wait := fs.Duration("wait", 20*time.Second, "how long to wait for the Restarting message after READY")
	fs.Parse(args)
	if *serverURL == "" || fs.NArg() != 0 || *nClients < 2 {
		fmt.Fprintln(os.Stderr, "restart: need -url and at least 2 -clients")
		os.Exit(2)
	}
	startWatchdog(connectTimeout + *wait + 10*time.Second)
	log.SetFlags(log.Lmicroseconds)
	log.SetOutput(os.Stderr)
	netMon := netmon.NewStatic()

	clients := make([]*testClient, *nClients)
	for i := range clients {
		tc := &testClient{idx: i, name: fmt.Sprintf("client %d", i), priv: key.NewNode(), events: make(chan event, 256)}
		tc.pub = tc.priv.Public()
		c, err := derphttp.NewClient(tc.priv, *serverURL, logger.Discard, netMon)
		if err != nil {
			fail("restart flags", "derphttp.NewClient: %v", err)
		}
		tc.c = c
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		err = c.Connect(ctx)
		cancel()
		if err != nil {
			fail("connect "+tc.name, "%v", err)
		}
		go tc.recvLoop()
		tc.waitFor("login "+tc.name, isServerInfo)
		clients[i] = tc
	}
	// One packet, so that each connection is known to be fully up.
	for i, src := range clients {
		dst := clients[(i+1)%len(clients)]
		what := fmt.Sprintf("packet %s -> %s", src.name, dst.name)
		src.send(what, dst.pub, []byte(what))
		dst.waitFor(what, func(m derp.ReceivedMessage) bool {
			_, ok := m.(derp.ReceivedPacket)
			return ok
		})
	}
	pass("restart: %d clients logged in and relaying", len(clients))
	info("READY")

	deadline := time.Now().Add(*wait)
	for _, tc := range clients {
		what := "Restarting to " + tc.name
		var rm derp.ServerRestartingMessage
		for got := false; !got; {
			select {
			case ev := <-tc.events:
				if ev.err != nil {
					fail(what, "connection ended before a Restarting message: %v", ev.err)
				}
				rm, got = ev.msg.(derp.ServerRestartingMessage)
				if !got {
					log.Printf("%s: ignoring %s", tc.name, describe(ev.msg))
				}
			case <-time.After(time.Until(deadline)):
				fail(what, "no Restarting message within %v", *wait)
			}
		}
		if rm.ReconnectIn < 0 || rm.ReconnectIn >= *maxReconnectIn {
			fail(what, "ReconnectIn %v, want in [0, %v)", rm.ReconnectIn, *maxReconnectIn)
		}
		if rm.TryFor != *tryFor {
			fail(what, "TryFor %v, want %v", rm.TryFor, *tryFor)
		}
		pass("%s: ReconnectIn %v, TryFor %v", what, rm.ReconnectIn, rm.TryFor)
		// Then the server closes the connection.
		select {
		case ev := <-tc.events:
			if ev.err == nil {
				fail(what, "message %s after Restarting, want the connection closed", describe(ev.msg))
			}
			pass("%s: connection closed after Restarting (%v)", tc.name, ev.err)
		case <-time.After(time.Until(deadline)):
			fail(what, "connection still open %v after READY", *wait)
		}
	}
	pass("restart: all checks (%d clients)", len(clients))
}
