// Command derp-interop checks a DERP relay server (and its STUN server) with
// Tailscale's own client packages (tailscale.com/derp/derphttp and
// tailscale.com/net/stun), so that derpd is tested against the real client
// code rather than against our own reading of the protocol.
//
// Usage:
//
//	derp-interop relay [-clients N] -url http://HOST:PORT/derp
//	derp-interop relay [-clients N] -host H -port P -pin sha256-raw:HEX
//	derp-interop stun -addr HOST:PORT
//	derp-interop mesh -a HOST:PORT/sha256-raw:HEX -b HOST:PORT/sha256-raw:HEX
//	derp-interop restart [-clients N] -url http://HOST:PORT/derp
//	derp-interop headscale-yaml -file F -host H -pin sha256-raw:HEX [-derp-port P] [-stun-port S] [-node-json F] [-policy F] [-connect]
//	derp-interop nodes -derp HOST:PORT/sha256-raw:HEX[,...] [-ws] [-strays DEV]
//	derp-interop nodes -derp http://HOST:PORT[,...] [-ws] [-strays DEV]
//	derp-interop strays -strays DEV
//
// Every check prints "PASS <what>" on success. The first failure prints
// "FAIL <what>: <reason>" and exits with status 1. Extra information is
// printed on lines starting with "INFO". Client logs go to stderr.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"log"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

const (
	// connectTimeout bounds one client's TCP+TLS+HTTP upgrade+DERP login.
	connectTimeout = 10 * time.Second
	// msgTimeout bounds the wait for one expected DERP message.
	msgTimeout = 5 * time.Second
	// pingTimeout bounds Client.Ping (which itself never waits more than 5 s).
	pingTimeout = 5 * time.Second
)

// stdout is guarded so that PASS/FAIL lines from different goroutines
// (the watchdog) never interleave.
var outMu sync.Mutex

func pass(format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf("PASS "+format+"\n", args...)
}

func info(format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf("INFO "+format+"\n", args...)
}

// fail prints a FAIL line and exits with status 1.
func fail(what string, format string, args ...any) {
	outMu.Lock()
	fmt.Printf("FAIL %s: %s\n", what, fmt.Sprintf(format, args...))
	os.Exit(1) // exits while holding outMu, so nothing else is printed
}

// startWatchdog fails the whole run if it has not finished within d.
func startWatchdog(d time.Duration) {
	time.AfterFunc(d, func() {
		fail("run", "did not finish within %v", d)
	})
}

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  derp-interop relay [-clients N] -url http://HOST:PORT/derp
  derp-interop relay [-clients N] -host H -port P -pin sha256-raw:HEX
  derp-interop stun -addr HOST:PORT
  derp-interop mesh -a HOST:PORT/sha256-raw:HEX -b HOST:PORT/sha256-raw:HEX
  derp-interop restart [-clients N] -url http://HOST:PORT/derp
  derp-interop headscale-yaml -file F -host H -pin sha256-raw:HEX [-derp-port P] [-stun-port S]
      [-node-json F] [-policy F] [-connect]
  derp-interop nodes -derp HOST:PORT/sha256-raw:HEX[,...] [-ws] [-strays DEV]
  derp-interop nodes -derp http://HOST:PORT[,...] [-ws] [-strays DEV]
  derp-interop strays -strays DEV
`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "relay":
		runRelay(os.Args[2:])
	case "stun":
		runSTUN(os.Args[2:])
	case "mesh":
		runMesh(os.Args[2:])
	case "restart":
		runRestart(os.Args[2:])
	case "churn":
		runChurn(os.Args[2:])
	case "headscale-yaml":
		runHeadscaleYAML(os.Args[2:])
	case "nodes":
		runNodes(os.Args[2:])
	case "strays":
		runStrays(os.Args[2:])
	case "-h", "-help", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "unknown subcommand %q\n", os.Args[1])
		usage()
	}
}

// ---------------------------------------------------------------------------
// relay

// event is one result of Client.RecvDetail, copied so that it stays valid
// after the next Recv call.
type event struct {
	msg     derp.ReceivedMessage
	connGen int
	err     error
}

type testClient struct {
	idx    int
	name   string
	priv   key.NodePrivate
	pub    key.NodePublic
	c      *derphttp.Client
	events chan event

	mu      sync.Mutex
	recvErr error // set once the receive loop stopped
}

func (tc *testClient) deadErr() error {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.recvErr
}

// recvLoop runs Recv in a loop and forwards every message to tc.events.
// It stops at the first error: derphttp would otherwise silently reconnect
// on the next call, which would hide a server that dropped the connection.
func (tc *testClient) recvLoop() {
	for {
		m, gen, err := tc.c.RecvDetail()
		if pkt, ok := m.(derp.ReceivedPacket); ok {
			pkt.Data = bytes.Clone(pkt.Data) // Data aliases the client's buffer
			m = pkt
		}
		if err != nil {
			tc.mu.Lock()
			tc.recvErr = err
			tc.mu.Unlock()
		}
		tc.events <- event{msg: m, connGen: gen, err: err}
		if err != nil {
			return
		}
	}
}

// next returns the next message received by tc, failing check `what` on
// receive error, reconnection, or timeout.
func (tc *testClient) next(what string, deadline time.Time) derp.ReceivedMessage {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case ev := <-tc.events:
		if ev.err != nil {
			fail(what, "%s: receive error: %v", tc.name, ev.err)
		}
		if ev.connGen != 1 {
			fail(what, "%s: client reconnected (connection generation %d); the server dropped the first connection", tc.name, ev.connGen)
		}
		return ev.msg
	case <-timer.C:
		fail(what, "%s: no message within %v", tc.name, msgTimeout)
	}
	panic("unreachable")
}

// waitFor returns the first message for which match returns true, ignoring
// (and logging) every message for which it returns false. match may call fail.
func (tc *testClient) waitFor(what string, match func(derp.ReceivedMessage) bool) derp.ReceivedMessage {
	deadline := time.Now().Add(msgTimeout)
	for {
		m := tc.next(what, deadline)
		if match(m) {
			return m
		}
		log.Printf("%s: ignoring %s while waiting for: %s", tc.name, describe(m), what)
	}
}

// waitDisconnected waits for PeerGone(peer, Disconnected) and passes check what.
func (tc *testClient) waitDisconnected(what string, peer key.NodePublic) {
	tc.waitFor(what, func(m derp.ReceivedMessage) bool {
		pg, ok := m.(derp.PeerGoneMessage)
		if !ok || pg.Peer != peer {
			return false
		}
		if pg.Reason != derp.PeerGoneReasonDisconnected {
			fail(what, "PeerGone reason %#x, want Disconnected (0x00)", byte(pg.Reason))
		}
		return true
	})
	pass("%s", what)
}

func describe(m derp.ReceivedMessage) string {
	switch m := m.(type) {
	case derp.ReceivedPacket:
		return fmt.Sprintf("packet from %v (%d bytes)", m.Source.ShortString(), len(m.Data))
	case derp.PeerGoneMessage:
		return fmt.Sprintf("PeerGone{%v, reason %#x}", m.Peer.ShortString(), byte(m.Reason))
	case derp.PeerPresentMessage:
		return fmt.Sprintf("PeerPresent{%v}", m.Key.ShortString())
	case derp.ServerInfoMessage:
		return fmt.Sprintf("ServerInfo%+v", m)
	case derp.KeepAliveMessage:
		return "KeepAlive"
	default:
		return fmt.Sprintf("%T", m)
	}
}

func (tc *testClient) send(what string, dst key.NodePublic, pkt []byte) {
	if err := tc.deadErr(); err != nil {
		fail(what, "%s: connection already failed: %v", tc.name, err)
	}
	if err := tc.c.Send(dst, pkt); err != nil {
		fail(what, "%s: Send: %v", tc.name, err)
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// metaCertKey returns the server key from a DERP "meta cert" among the peer
// certificates (CN "derpkey<64 hex>", serial = protocol version 1..255), as
// derphttp's parseMetaCert does. derphttp fast-starts (sends Derp-Fast-Start: 1
// and does not wait for the HTTP 101 or ServerKey) exactly when it finds one
// over TLS 1.3.
func metaCertKey(cs *tls.ConnectionState) (k key.NodePublic, ok bool) {
	for _, c := range cs.PeerCertificates {
		h, found := strings.CutPrefix(c.Subject.CommonName, "derpkey")
		if !found {
			continue
		}
		raw, err := hex.DecodeString(h)
		if err != nil || len(raw) != 32 || c.SerialNumber == nil || c.SerialNumber.BitLen() > 8 || c.SerialNumber.Sign() <= 0 {
			continue
		}
		return key.NodePublicFromRaw32(mem.B(raw)), true
	}
	return key.NodePublic{}, false
}

func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLS 1.3"
	case tls.VersionTLS12:
		return "TLS 1.2"
	default:
		return fmt.Sprintf("TLS %#x", v)
	}
}

func runRelay(args []string) {
	fs := flag.NewFlagSet("relay", flag.ExitOnError)
	nClients := fs.Int("clients", 3, "number of DERP clients (at least 2)")
	serverURL := fs.String("url", "", "DERP URL for plain-HTTP (dev mode) servers, e.g. http://127.0.0.1:3340/derp")
	host := fs.String("host", "", "server host name or IP (TLS mode, with -port and -pin)")
	port := fs.Int("port", 0, "server TLS port (TLS mode)")
	pin := fs.String("pin", "", "expected certificate, as tailcfg.DERPNode.CertName: sha256-raw:<hex of the whole DER cert>")
	total := fs.Duration("timeout", 28*time.Second, "overall time limit for the run")
	quiet := fs.Bool("quiet", false, "do not log Tailscale client messages to stderr")
	fs.Parse(args)
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "relay: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}
	startWatchdog(*total)

	if *nClients < 2 {
		fail("relay flags", "-clients must be at least 2, got %d", *nClients)
	}
	useURL := *serverURL != ""
	if useURL == (*host != "") {
		fail("relay flags", "give exactly one of -url or -host/-port/-pin")
	}
	if !useURL && (*port <= 0 || *port > 65535) {
		fail("relay flags", "-host needs a valid -port")
	}

	log.SetFlags(log.Lmicroseconds)
	log.SetOutput(os.Stderr)

	netMon := netmon.NewStatic()

	var region *tailcfg.DERPRegion
	if !useURL {
		node := &tailcfg.DERPNode{
			Name:     "900a",
			RegionID: 900,
			HostName: *host,
			DERPPort: *port,
			CertName: *pin,
		}
		if ip, err := netip.ParseAddr(*host); err == nil {
			if ip.Unmap().Is4() {
				node.IPv4 = ip.Unmap().String()
			} else {
				node.IPv6 = ip.String()
			}
		}
		region = &tailcfg.DERPRegion{
			RegionID:   900,
			RegionCode: "test",
			RegionName: "derpd interop test",
			Nodes:      []*tailcfg.DERPNode{node},
		}
	}

	clients := make([]*testClient, *nClients)
	for i := range clients {
		tc := &testClient{
			idx:    i,
			name:   fmt.Sprintf("client %d", i),
			priv:   key.NewNode(),
			events: make(chan event, 256),
		}
		tc.pub = tc.priv.Public()
		logf := logger.Discard
		if !*quiet {
			prefix := fmt.Sprintf("[%s] ", tc.name)
			logf = func(format string, args ...any) { log.Printf(prefix+format, args...) }
		}
		if useURL {
			c, err := derphttp.NewClient(tc.priv, *serverURL, logf, netMon)
			if err != nil {
				fail("relay flags", "derphttp.NewClient: %v", err)
			}
			tc.c = c
		} else {
			tc.c = derphttp.NewRegionClient(tc.priv, logf, netMon, func() *tailcfg.DERPRegion { return region })
		}
		clients[i] = tc
	}
	defer func() {
		for _, tc := range clients {
			tc.c.Close()
		}
	}()

	// (a) Each client connects; its first message must be ServerInfo.
	var serverKey key.NodePublic
	for _, tc := range clients {
		what := fmt.Sprintf("connect %s", tc.name)
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		err := tc.c.Connect(ctx)
		cancel()
		if err != nil {
			fail(what, "%v", err)
		}
		go tc.recvLoop()
		m := tc.next(what, time.Now().Add(msgTimeout))
		si, ok := m.(derp.ServerInfoMessage)
		if !ok {
			fail(what, "first message is %s, want ServerInfo", describe(m))
		}
		sk := tc.c.ServerPublicKey()
		if sk.IsZero() {
			fail(what, "server public key unknown after login")
		}
		if tc.idx == 0 {
			serverKey = sk
		} else if sk != serverKey {
			fail(what, "server key %v differs from client 0's %v", sk, serverKey)
		}
		detail := "plain HTTP, client fast start: false"
		if cs, ok := tc.c.TLSConnectionState(); ok {
			mk, meta := metaCertKey(cs)
			if meta && mk != sk {
				fail(what, "meta cert key %v differs from the server key %v", mk, sk)
			}
			detail = fmt.Sprintf("%s, meta cert: %v, client fast start: %v", tlsVersionName(cs.Version), meta, meta && cs.Version >= tls.VersionTLS13)
		}
		info("%s: %s, local %s, server key %v, ServerInfo %+v", tc.name, detail, localAddr(tc.c), sk, si)
		pass("%s: first message is ServerInfo", what)
	}

	// (b) Every ordered pair of distinct clients exchanges a packet.
	for _, src := range clients {
		for _, dst := range clients {
			if src == dst {
				continue
			}
			what := fmt.Sprintf("packet %s -> %s", src.name, dst.name)
			payload := randBytes(90 + src.idx*len(clients) + dst.idx) // ~100 bytes, distinct per pair
			src.send(what, dst.pub, payload)
			dst.waitFor(what, func(m derp.ReceivedMessage) bool {
				pkt, ok := m.(derp.ReceivedPacket)
				if !ok {
					return false
				}
				if pkt.Source != src.pub {
					fail(what, "packet from %v, want source %v", pkt.Source, src.pub)
				}
				if !bytes.Equal(pkt.Data, payload) {
					fail(what, "payload differs: got %d bytes %x, want %d bytes %x", len(pkt.Data), pkt.Data, len(payload), payload)
				}
				return true
			})
			pass("%s (%d bytes, source key and payload match)", what, len(payload))
		}
	}

	// (c) Ping from client 0 (its receive loop handles the Pong).
	{
		what := fmt.Sprintf("ping %s", clients[0].name)
		ctx, cancel := context.WithTimeout(context.Background(), pingTimeout)
		err := clients[0].c.Ping(ctx)
		cancel()
		if err != nil {
			fail(what, "%v", err)
		}
		pass("%s", what)
	}

	// (d) A disco-looking packet to an unknown key yields PeerGone(NotHere).
	{
		sender := clients[len(clients)-1]
		unknown := key.NewNode().Public()
		what := fmt.Sprintf("peer-gone not-here: %s sends disco packet to unknown key %v", sender.name, unknown.ShortString())
		pkt := append([]byte("TS\xf0\x9f\x92\xac"), randBytes(32+24+16)...) // magic, disco key, nonce, box
		sender.send(what, unknown, pkt)
		sender.waitFor(what, func(m derp.ReceivedMessage) bool {
			pg, ok := m.(derp.PeerGoneMessage)
			if !ok || pg.Peer != unknown {
				return false
			}
			if pg.Reason != derp.PeerGoneReasonNotHere {
				fail(what, "PeerGone reason %#x, want NotHere (0x01)", byte(pg.Reason))
			}
			return true
		})
		pass("%s (%d-byte packet)", what, len(pkt))
	}

	// (e) Client 0 closes; everyone who received from it gets PeerGone(Disconnected).
	{
		gone := clients[0]
		if err := gone.c.Close(); err != nil {
			fail("close "+gone.name, "%v", err)
		}
		for _, tc := range clients[1:] {
			tc.waitDisconnected(fmt.Sprintf("peer-gone disconnected: %s told %s left", tc.name, gone.name), gone.pub)
		}
	}

	pass("relay: all checks (%d clients)", len(clients))
}

func localAddr(c *derphttp.Client) string {
	ap, err := c.LocalAddr()
	if err != nil {
		return "?"
	}
	return ap.String()
}

// ---------------------------------------------------------------------------
// stun

const (
	stunTries       = 3
	stunReplyWait   = 2 * time.Second
	stunSilenceWait = 500 * time.Millisecond
)

// plainBindingRequest returns an RFC 5389 binding request that is not from
// Tailscale: no SOFTWARE "tailnode" attribute. With fingerprint, it carries
// a valid FINGERPRINT attribute (so only the missing SOFTWARE makes it
// non-Tailscale); without, it is the bare 20-byte header.
func plainBindingRequest(tx stun.TxID, fingerprint bool) []byte {
	b := make([]byte, 0, 28)
	b = append(b, 0x00, 0x01) // Binding request
	if fingerprint {
		b = binary.BigEndian.AppendUint16(b, 8)
	} else {
		b = binary.BigEndian.AppendUint16(b, 0)
	}
	b = append(b, 0x21, 0x12, 0xa4, 0x42) // magic cookie
	b = append(b, tx[:]...)
	if fingerprint {
		fp := crc32.ChecksumIEEE(b) ^ 0x5354554e
		b = binary.BigEndian.AppendUint16(b, 0x8028)
		b = binary.BigEndian.AppendUint16(b, 4)
		b = binary.BigEndian.AppendUint32(b, fp)
	}
	return b
}

func runSTUN(args []string) {
	fs := flag.NewFlagSet("stun", flag.ExitOnError)
	addrFlag := fs.String("addr", "", "STUN server address HOST:PORT, e.g. 127.0.0.1:3478 or [::1]:3478")
	total := fs.Duration("timeout", 20*time.Second, "overall time limit for the run")
	bindFlag := fs.String("bind", "", "local IP to send from (default: loopback of the server's family)")
	fs.Parse(args)
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "stun: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}
	startWatchdog(*total)
	if *addrFlag == "" {
		fail("stun flags", "-addr is required")
	}
	ua, err := net.ResolveUDPAddr("udp", *addrFlag)
	if err != nil {
		fail("stun flags", "bad -addr %q: %v", *addrFlag, err)
	}
	server := ua.AddrPort()
	server = netip.AddrPortFrom(server.Addr().Unmap(), server.Port())

	var bind netip.Addr
	if server.Addr().Is4() {
		bind = netip.MustParseAddr("127.0.0.1")
	} else {
		bind = netip.IPv6Loopback()
	}
	if *bindFlag != "" {
		if bind, err = netip.ParseAddr(*bindFlag); err != nil {
			fail("stun flags", "bad -bind %q: %v", *bindFlag, err)
		}
	}
	what := fmt.Sprintf("stun binding %s", server)
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(bind, 0)))
	if err != nil {
		fail(what, "listen on %s: %v", bind, err)
	}
	defer conn.Close()
	la := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	local := netip.AddrPortFrom(la.Addr().Unmap(), la.Port())

	sent := map[stun.TxID]bool{} // Tailscale requests sent so far (late replies to these are harmless)
	buf := make([]byte, 2048)

	// readFrom reads one datagram from server until deadline. ok=false on timeout.
	readFrom := func(what string, deadline time.Time) (pkt []byte, ok bool) {
		for {
			if err := conn.SetReadDeadline(deadline); err != nil {
				fail(what, "SetReadDeadline: %v", err)
			}
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					return nil, false
				}
				fail(what, "read: %v", err)
			}
			from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
			if from != server {
				log.Printf("ignoring %d bytes from %s (not the server)", n, from)
				continue
			}
			return bytes.Clone(buf[:n]), true
		}
	}

	// 1. A Tailscale binding request gets a response with our own address.
	got := false
	for try := 1; try <= stunTries && !got; try++ {
		tx := stun.NewTxID()
		sent[tx] = true
		if _, err := conn.WriteToUDPAddrPort(stun.Request(tx), server); err != nil {
			fail(what, "send: %v", err)
		}
		deadline := time.Now().Add(stunReplyWait)
		for {
			pkt, ok := readFrom(what, deadline)
			if !ok {
				info("%s: no reply to try %d within %v", what, try, stunReplyWait)
				break
			}
			rtx, mapped, err := stun.ParseResponse(pkt)
			if err != nil {
				fail(what, "stun.ParseResponse: %v (packet %x)", err, pkt)
			}
			if !sent[rtx] {
				fail(what, "response transaction ID %x matches no request sent", rtx[:])
			}
			if rtx != tx {
				log.Printf("late reply to an earlier try (%x); ignored", rtx[:])
				continue
			}
			mapped = netip.AddrPortFrom(mapped.Addr().Unmap(), mapped.Port())
			if mapped != local {
				fail(what, "mapped address %s, want the socket's local address %s", mapped, local)
			}
			pass("%s: response txID matches, mapped address %s equals local address (try %d)", what, mapped, try)
			got = true
			break
		}
	}
	if !got {
		fail(what, "no response after %d tries of %v", stunTries, stunReplyWait)
	}

	// 2. Non-Tailscale binding requests get no reply.
	for _, fp := range []bool{false, true} {
		kind := "bare header"
		if fp {
			kind = "with FINGERPRINT"
		}
		what := fmt.Sprintf("stun ignores non-Tailscale binding request (%s, no SOFTWARE=tailnode)", kind)
		tx := stun.NewTxID()
		if _, err := conn.WriteToUDPAddrPort(plainBindingRequest(tx, fp), server); err != nil {
			fail(what, "send: %v", err)
		}
		deadline := time.Now().Add(stunSilenceWait)
		for {
			pkt, ok := readFrom(what, deadline)
			if !ok {
				break // silence, as expected
			}
			if rtx, _, err := stun.ParseResponse(pkt); err == nil && sent[rtx] {
				log.Printf("late reply to an earlier Tailscale request (%x); ignored", rtx[:])
				continue
			}
			fail(what, "got a %d-byte reply within %v: %x", len(pkt), stunSilenceWait, pkt)
		}
		pass("%s: no reply within %v", what, stunSilenceWait)
	}
	pass("stun: all checks (%s)", server)
}

// ---------------------------------------------------------------------------
// mesh

// pinnedRegion is a one-node DERP region for a TLS server with a
// self-signed IP certificate, given as HOST:PORT/sha256-raw:HEX.
func pinnedRegion(spec string) (*tailcfg.DERPRegion, error) {
	hostPort, pin, ok := strings.Cut(spec, "/")
	if !ok || !strings.HasPrefix(pin, "sha256-raw:") {
		return nil, fmt.Errorf("node %q: want HOST:PORT/sha256-raw:HEX", spec)
	}
	ap, err := netip.ParseAddrPort(hostPort)
	if err != nil {
		return nil, fmt.Errorf("node %q: %v", spec, err)
	}
	node := &tailcfg.DERPNode{
		Name:     "900a",
		RegionID: 900,
		HostName: ap.Addr().String(),
		DERPPort: int(ap.Port()),
		CertName: pin,
	}
	if ap.Addr().Unmap().Is4() {
		node.IPv4 = ap.Addr().Unmap().String()
	} else {
		node.IPv6 = ap.Addr().String()
	}
	return &tailcfg.DERPRegion{
		RegionID:   900,
		RegionCode: "test",
		RegionName: "derpd interop test",
		Nodes:      []*tailcfg.DERPNode{node},
	}, nil
}

// runMesh checks two meshed servers A and B of one region with Tailscale
// clients: x1, x2 homed on A, y1, y2 homed on B. Packets cross the mesh both
// ways (x1<->y1, x2<->y2); then x1 leaves and y1 must hear PeerGone(x1), and
// y2 leaves and x2 must hear PeerGone(y2). Forwarding between the nodes is
// set up asynchronously (a node learns the other's clients from its
// WatchConns stream), so the first packet of each direction is re-sent every
// 200 ms until it arrives or -forward-timeout passes.
func runMesh(args []string) {
	fs := flag.NewFlagSet("mesh", flag.ExitOnError)
	specA := fs.String("a", "", "node A: HOST:PORT/sha256-raw:HEX")
	specB := fs.String("b", "", "node B: HOST:PORT/sha256-raw:HEX")
	fwdTimeout := fs.Duration("forward-timeout", 10*time.Second, "time allowed for the first forwarded packet of each direction")
	total := fs.Duration("timeout", 40*time.Second, "overall time limit for the run")
	fs.Parse(args)
	if fs.NArg() != 0 || *specA == "" || *specB == "" {
		fmt.Fprintf(os.Stderr, "mesh: want -a and -b\n")
		os.Exit(2)
	}
	startWatchdog(*total)
	start := time.Now()
	log.SetFlags(log.Lmicroseconds)
	log.SetOutput(os.Stderr)
	netMon := netmon.NewStatic()

	regions := map[string]*tailcfg.DERPRegion{}
	for name, spec := range map[string]string{"A": *specA, "B": *specB} {
		r, err := pinnedRegion(spec)
		if err != nil {
			fail("mesh flags", "%v", err)
		}
		regions[name] = r
	}
	newClient := func(name, node string) *testClient {
		tc := &testClient{name: name + "@" + node, priv: key.NewNode(), events: make(chan event, 256)}
		tc.pub = tc.priv.Public()
		prefix := fmt.Sprintf("[%s] ", tc.name)
		logf := func(format string, args ...any) { log.Printf(prefix+format, args...) }
		region := regions[node]
		tc.c = derphttp.NewRegionClient(tc.priv, logf, netMon, func() *tailcfg.DERPRegion { return region })
		what := "connect " + tc.name
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		err := tc.c.Connect(ctx)
		cancel()
		if err != nil {
			fail(what, "%v", err)
		}
		go tc.recvLoop()
		if m := tc.next(what, time.Now().Add(msgTimeout)); !isServerInfo(m) {
			fail(what, "first message is %s, want ServerInfo", describe(m))
		}
		pass("%s (server key %v)", what, tc.c.ServerPublicKey().ShortString())
		return tc
	}
	x1, x2 := newClient("x1", "A"), newClient("x2", "A")
	y1, y2 := newClient("y1", "B"), newClient("y2", "B")
	defer func() {
		for _, tc := range []*testClient{x1, x2, y1, y2} {
			tc.c.Close()
		}
	}()
	if x1.c.ServerPublicKey() == y1.c.ServerPublicKey() {
		fail("mesh setup", "A and B have the same server key %v", x1.c.ServerPublicKey())
	}

	// exchange sends one packet src->dst, re-sending it every 200 ms until it
	// arrives (the first packet of a direction waits for the mesh).
	exchange := func(src, dst *testClient) {
		what := fmt.Sprintf("packet %s -> %s across the mesh", src.name, dst.name)
		payload := randBytes(100)
		src.send(what, dst.pub, payload)
		sent := time.Now()
		deadline := sent.Add(*fwdTimeout)
		resend := time.NewTicker(200 * time.Millisecond)
		defer resend.Stop()
		for {
			select {
			case ev := <-dst.events:
				if ev.err != nil {
					fail(what, "%s: receive error: %v", dst.name, ev.err)
				}
				pkt, ok := ev.msg.(derp.ReceivedPacket)
				if !ok || !bytes.Equal(pkt.Data, payload) {
					log.Printf("%s: ignoring %s while waiting for: %s", dst.name, describe(ev.msg), what)
					continue
				}
				if pkt.Source != src.pub {
					fail(what, "packet from %v, want source %v", pkt.Source, src.pub)
				}
				info("%s: arrived %v after the first send, %v after the harness started", what, time.Since(sent).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
				pass("%s", what)
				return
			case <-resend.C:
				src.send(what, dst.pub, payload)
			case <-time.After(time.Until(deadline)):
				fail(what, "not received within %v", time.Until(deadline)+time.Since(sent))
			}
		}
	}
	exchange(x1, y1)
	exchange(y1, x1)
	exchange(x2, y2)
	exchange(y2, x2)

	gone := func(leaver, listener *testClient) {
		if err := leaver.c.Close(); err != nil {
			fail("close "+leaver.name, "%v", err)
		}
		listener.waitDisconnected(fmt.Sprintf("peer-gone across the mesh: %s told %s left", listener.name, leaver.name), leaver.pub)
	}
	gone(x1, y1)
	gone(y2, x2)
	pass("mesh: all checks")
}

func isServerInfo(m derp.ReceivedMessage) bool {
	_, ok := m.(derp.ServerInfoMessage)
	return ok
}
