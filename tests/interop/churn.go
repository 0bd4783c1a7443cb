package main

// churn: a soak load made of Tailscale's own DERP client (bench/soak.sh).
//
//	derp-interop churn [-clients N] [-duration D] -url http://HOST:PORT/derp
//	derp-interop churn [-clients N] [-duration D] -host H -port P -pin sha256-raw:HEX
//	derp-interop churn -fresh-keys ...
//
// N client slots run until the duration is over. Each slot has a fixed node
// key (as a Tailscale node keeps its key across reconnects), or with
// -fresh-keys a new key for every connection (every departure is then a key
// leaving for good, whose PeerGone its receivers must hear), and repeats: log in
// with a fresh derphttp.Client, mark the connection preferred, live for a random
// time (-min-life..-max-life) sending a packet of random size to a random other
// slot every -interval (with jitter), close, wait up to -max-pause, and start
// again. The receive loop counts what arrives. Once a minute, and at the end, it
// prints counters as "key=value" words on a line starting with PROGRESS or
// SUMMARY; the run fails (exit 1) only on a setup error or if no login worked.

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// churnStats are the run's counters; every field is updated atomically.
type churnStats struct {
	logins        atomic.Int64 // Connect succeeded
	loginErrors   atomic.Int64 // Connect failed
	sends         atomic.Int64 // Send returned nil
	sendErrors    atomic.Int64 // Send failed
	received      atomic.Int64 // packets received from another slot
	bytesReceived atomic.Int64
	peerGone      atomic.Int64 // PeerGone frames
	keepAlives    atomic.Int64
	drops         atomic.Int64 // the server closed a connection before its client did
	reconnects    atomic.Int64 // derphttp reconnected on its own within a life
	corrupt       atomic.Int64 // a packet whose header does not match its source
}

func (s *churnStats) line(prefix string, elapsed time.Duration) string {
	return fmt.Sprintf("%s elapsed_s=%d logins=%d login_errors=%d sends=%d send_errors=%d received=%d bytes_received=%d peer_gone=%d keepalives=%d server_closed=%d reconnects=%d corrupt=%d",
		prefix, int(elapsed.Seconds()), s.logins.Load(), s.loginErrors.Load(), s.sends.Load(), s.sendErrors.Load(),
		s.received.Load(), s.bytesReceived.Load(), s.peerGone.Load(), s.keepAlives.Load(), s.drops.Load(),
		s.reconnects.Load(), s.corrupt.Load())
}

// churnPacket is at least 16 bytes: source slot, destination slot, sequence.
func churnPacket(src, dst int, seq uint64, size int) []byte {
	b := make([]byte, max(size, 16))
	binary.BigEndian.PutUint32(b[0:], uint32(src))
	binary.BigEndian.PutUint32(b[4:], uint32(dst))
	binary.BigEndian.PutUint64(b[8:], seq)
	return b
}

func runChurn(args []string) {
	fs := flag.NewFlagSet("churn", flag.ExitOnError)
	nClients := fs.Int("clients", 200, "client slots (at least 2)")
	duration := fs.Duration("duration", 30*time.Minute, "how long to run")
	minLife := fs.Duration("min-life", 5*time.Second, "shortest connection life")
	maxLife := fs.Duration("max-life", 60*time.Second, "longest connection life")
	maxPause := fs.Duration("max-pause", 2*time.Second, "longest pause between a close and the next login")
	interval := fs.Duration("interval", 500*time.Millisecond, "mean time between two packets of one client")
	minSize := fs.Int("min-size", 64, "smallest packet")
	maxSize := fs.Int("max-size", 1400, "largest packet")
	serverURL := fs.String("url", "", "DERP URL of a plain-HTTP server, e.g. http://127.0.0.1:3340/derp")
	host := fs.String("host", "", "server IP (TLS, with -port and -pin)")
	port := fs.Int("port", 0, "server TLS port")
	pin := fs.String("pin", "", "certificate pin, sha256-raw:<hex>")
	freshKeys := fs.Bool("fresh-keys", false, "a new node key for every connection")
	fs.Parse(args)
	if fs.NArg() != 0 || *nClients < 2 || *minLife <= 0 || *maxLife < *minLife || *interval <= 0 ||
		*minSize < 16 || *maxSize < *minSize || *maxSize > derp.MaxPacketSize {
		fmt.Fprintln(os.Stderr, "churn: bad flags")
		fs.Usage()
		os.Exit(2)
	}
	if (*serverURL != "") == (*host != "") {
		fail("churn flags", "give exactly one of -url or -host/-port/-pin")
	}
	var region *tailcfg.DERPRegion
	if *host != "" {
		ip, err := netip.ParseAddr(*host)
		if err != nil || *port <= 0 || *port > 65535 {
			fail("churn flags", "-host must be an IP and -port valid")
		}
		node := &tailcfg.DERPNode{Name: "900a", RegionID: 900, HostName: *host, DERPPort: *port, CertName: *pin}
		if ip.Unmap().Is4() {
			node.IPv4 = ip.Unmap().String()
		} else {
			node.IPv6 = ip.String()
		}
		region = &tailcfg.DERPRegion{RegionID: 900, RegionCode: "soak", RegionName: "derpd soak", Nodes: []*tailcfg.DERPNode{node}}
	}
	netMon := netmon.NewStatic()
	newClient := func(priv key.NodePrivate) (*derphttp.Client, error) {
		if region != nil {
			return derphttp.NewRegionClient(priv, logger.Discard, netMon, func() *tailcfg.DERPRegion { return region }), nil
		}
		return derphttp.NewClient(priv, *serverURL, logger.Discard, netMon)
	}

	// Each slot's current key; with -fresh-keys it changes at every login, so it is read
	// and written under keysMu. slotOf holds every key a slot has had.
	var keysMu sync.Mutex
	privs := make([]key.NodePrivate, *nClients)
	pubs := make([]key.NodePublic, *nClients)
	slotOf := make(map[key.NodePublic]int, *nClients)
	newKey := func(i int) key.NodePrivate {
		priv := key.NewNode()
		keysMu.Lock()
		defer keysMu.Unlock()
		privs[i], pubs[i] = priv, priv.Public()
		slotOf[pubs[i]] = i
		return priv
	}
	for i := range privs {
		newKey(i)
	}
	keyOf := func(i int) key.NodePublic {
		keysMu.Lock()
		defer keysMu.Unlock()
		return pubs[i]
	}
	slotOfKey := func(k key.NodePublic) (int, bool) {
		keysMu.Lock()
		defer keysMu.Unlock()
		i, ok := slotOf[k]
		return i, ok
	}

	var st churnStats
	start := time.Now()
	end := start.Add(*duration)
	between := func(lo, hi time.Duration) time.Duration {
		if hi <= lo {
			return lo
		}
		return lo + rand.N(hi-lo)
	}

	// One life of slot i: returns when the life is over or the run ends.
	life := func(i int, seq *uint64) {
		keysMu.Lock()
		priv := privs[i]
		keysMu.Unlock()
		if *freshKeys {
			priv = newKey(i)
		}
		c, err := newClient(priv)
		if err != nil {
			fail("churn", "derphttp client: %v", err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		err = c.Connect(ctx)
		cancel()
		if err != nil {
			st.loginErrors.Add(1)
			return
		}
		st.logins.Add(1)
		c.NotePreferred(true)
		var closing atomic.Bool
		recvDone := make(chan struct{})
		go func() {
			defer close(recvDone)
			gen0 := 0
			for {
				m, gen, err := c.RecvDetail()
				if err != nil {
					if !closing.Load() && !errors.Is(err, derphttp.ErrClientClosed) {
						st.drops.Add(1)
					}
					return
				}
				if gen0 == 0 {
					gen0 = gen
				} else if gen != gen0 {
					st.reconnects.Add(1)
					gen0 = gen
				}
				switch m := m.(type) {
				case derp.ReceivedPacket:
					src, ok := slotOfKey(m.Source)
					if !ok || len(m.Data) < 16 || int(binary.BigEndian.Uint32(m.Data[0:])) != src ||
						int(binary.BigEndian.Uint32(m.Data[4:])) != i {
						st.corrupt.Add(1)
						continue
					}
					st.received.Add(1)
					st.bytesReceived.Add(int64(len(m.Data)))
				case derp.PeerGoneMessage:
					st.peerGone.Add(1)
				case derp.KeepAliveMessage:
					st.keepAlives.Add(1)
				}
			}
		}()
		dies := time.Now().Add(between(*minLife, *maxLife))
		if dies.After(end) {
			dies = end
		}
		for {
			wait := between(*interval/2, *interval*3/2)
			if time.Now().Add(wait).After(dies) {
				time.Sleep(time.Until(dies))
				break
			}
			time.Sleep(wait)
			dst := rand.N(len(pubs) - 1)
			if dst >= i {
				dst++
			}
			*seq++
			if err := c.Send(keyOf(dst), churnPacket(i, dst, *seq, *minSize+rand.N(*maxSize-*minSize+1))); err != nil {
				st.sendErrors.Add(1)
			} else {
				st.sends.Add(1)
			}
		}
		closing.Store(true)
		c.Close()
		<-recvDone
	}

	var wg sync.WaitGroup
	for i := range privs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Spread the first logins over the first second.
			time.Sleep(between(0, time.Second))
			var seq uint64
			for time.Now().Before(end) {
				life(i, &seq)
				time.Sleep(between(0, *maxPause))
			}
		}()
	}
	ticker := time.NewTicker(time.Minute)
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
loop:
	for {
		select {
		case <-ticker.C:
			info("%s", st.line("PROGRESS", time.Since(start)))
		case <-done:
			break loop
		}
	}
	ticker.Stop()
	outMu.Lock()
	fmt.Println(st.line("SUMMARY", time.Since(start)))
	outMu.Unlock()
	if st.logins.Load() == 0 {
		fail("churn", "no login succeeded")
	}
}
