package main

// headscale-yaml: the headscale DERP map file derpd logs, read the way
// headscale reads the files listed in its derp.paths: gopkg.in/yaml.v3's
// Unmarshal straight into tailcfg.DERPMap (loadDERPMapFromPath in
// hscontrol/derp/derp.go). tailcfg has no yaml tags, so yaml.v3 matches each
// field by its lower-cased name, case-sensitively.

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"reflect"
	"time"

	"gopkg.in/yaml.v3"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// loadLikeHeadscale is headscale's loadDERPMapFromPath.
func loadLikeHeadscale(path string) (*tailcfg.DERPMap, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var dm tailcfg.DERPMap
	err = yaml.Unmarshal(b, &dm)
	return &dm, err
}

func readFile(what, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		fail(what, "%v", err)
	}
	return b
}

func runHeadscaleYAML(args []string) {
	fs := flag.NewFlagSet("headscale-yaml", flag.ExitOnError)
	file := fs.String("file", "", "the YAML file derpd logged for headscale's derp.paths")
	host := fs.String("host", "", "expected HostName (an IP address)")
	pin := fs.String("pin", "", "expected CertName: sha256-raw:<hex>")
	derpPort := fs.Int("derp-port", 0, "expected DERPPort (0: left out, i.e. 443)")
	stunPort := fs.Int("stun-port", 0, "expected STUNPort (0: left out, i.e. 3478; -1: STUN off)")
	nodeJSON := fs.String("node-json", "", "optional: file with derpd's node JSON line (CamelCase), read the same way must lose the host name and pin")
	policy := fs.String("policy", "", "optional: file with derpd's tailnet policy file snippet; must hold the same region, and read as YAML must give no regions")
	connect := fs.Bool("connect", false, "also log in to the node, as a Tailscale client given this region")
	total := fs.Duration("timeout", 28*time.Second, "overall time limit for the run")
	fs.Parse(args)
	if fs.NArg() != 0 || *file == "" || *host == "" || *pin == "" {
		fmt.Fprintf(os.Stderr, "headscale-yaml: want -file, -host and -pin\n")
		os.Exit(2)
	}
	startWatchdog(*total)

	// (a) Read as headscale reads it.
	dm, err := loadLikeHeadscale(*file)
	if err != nil {
		fail("headscale-yaml decode", "yaml.v3 into tailcfg.DERPMap: %v", err)
	}
	pass("headscale-yaml decode: yaml.v3 into tailcfg.DERPMap without error")

	// (b) Every field, compared as a whole (nothing more, nothing less).
	node := &tailcfg.DERPNode{
		Name:     "900a",
		RegionID: 900,
		HostName: *host,
		CertName: *pin,
		STUNPort: *stunPort,
		DERPPort: *derpPort,
	}
	ip, err := netip.ParseAddr(*host)
	if err != nil {
		fail("headscale-yaml flags", "-host %q: %v", *host, err)
	}
	if ip.Is4() {
		node.IPv4 = *host
	} else {
		node.IPv6 = *host
	}
	want := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		900: {
			RegionID:   900,
			RegionCode: "derpd",
			RegionName: "derpd",
			Nodes:      []*tailcfg.DERPNode{node},
		},
	}}
	if !reflect.DeepEqual(dm, want) {
		fail("headscale-yaml fields", "got %s, want %s", describeMap(dm), describeMap(want))
	}
	pass("headscale-yaml fields: region 900 %q, node %+v", dm.Regions[900].RegionCode, *dm.Regions[900].Nodes[0])

	// (c) Every key names a field: yaml.v3 ignores unknown keys (as headscale
	// lets it), so a misspelt key would otherwise just vanish.
	dec := yaml.NewDecoder(bytes.NewReader(readFile("headscale-yaml strict", *file)))
	dec.KnownFields(true)
	var strict tailcfg.DERPMap
	if err := dec.Decode(&strict); err != nil {
		fail("headscale-yaml strict", "a key that is no tailcfg field: %v", err)
	}
	pass("headscale-yaml strict: every key is a tailcfg field")

	// (d) The CamelCase node JSON, read the way headscale reads YAML, parses
	// without error into a node with no host name and no pin: the silent
	// failure the YAML form exists for (and a check that a CamelCase YAML
	// would fail (b)). Read as JSON, it is the YAML's node.
	if *nodeJSON != "" {
		b := readFile("camelcase node", *nodeJSON)
		var asYAML tailcfg.DERPNode
		if err := yaml.Unmarshal(b, &asYAML); err != nil {
			fail("camelcase node as yaml", "yaml.v3 rejected it (%v); headscale users saw it accepted", err)
		}
		if asYAML.HostName != "" || asYAML.CertName != "" {
			fail("camelcase node as yaml", "HostName %q, CertName %q: want both empty (yaml.v3 keys are lower-case)", asYAML.HostName, asYAML.CertName)
		}
		pass("camelcase node as yaml: parses without error to HostName \"\", CertName \"\" (%+v)", asYAML)
		var asJSON tailcfg.DERPNode
		if err := json.Unmarshal(b, &asJSON); err != nil {
			fail("camelcase node as json", "%v", err)
		}
		if !reflect.DeepEqual(&asJSON, node) {
			fail("camelcase node as json", "got %+v, want the YAML's node %+v", asJSON, *node)
		}
		pass("camelcase node as json: the same node as the YAML's")
	}

	// (e) The policy file snippet holds the same map; read as headscale YAML
	// it is an empty map.
	if *policy != "" {
		b := readFile("policy snippet", *policy)
		var asYAML tailcfg.DERPMap
		if err := yaml.Unmarshal(b, &asYAML); err != nil {
			fail("policy snippet as yaml", "yaml.v3 rejected it (%v); headscale users saw it accepted", err)
		}
		if len(asYAML.Regions) != 0 {
			fail("policy snippet as yaml", "got %s, want no regions", describeMap(&asYAML))
		}
		pass("policy snippet as yaml: parses without error to no regions")
		var asJSON struct{ DERPMap *tailcfg.DERPMap }
		if err := json.Unmarshal(b, &asJSON); err != nil {
			fail("policy snippet as json", "%v", err)
		}
		if !reflect.DeepEqual(asJSON.DERPMap, want) {
			fail("policy snippet as json", "got %s, want the YAML's %s", describeMap(asJSON.DERPMap), describeMap(want))
		}
		pass("policy snippet as json: the same map as the YAML's")
	}

	// (f) A Tailscale client given the region headscale would serve: the
	// host, port and pin must get it logged in.
	if *connect {
		what := "connect with the headscale region"
		log.SetFlags(log.Lmicroseconds)
		log.SetOutput(os.Stderr)
		region := dm.Regions[900]
		logf := func(format string, args ...any) { log.Printf("[client] "+format, args...) }
		c := derphttp.NewRegionClient(key.NewNode(), logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
		err := c.Connect(ctx)
		cancel()
		if err != nil {
			fail(what, "%v", err)
		}
		m, err := c.Recv()
		if err != nil {
			fail(what, "first message: %v", err)
		}
		if _, ok := m.(derp.ServerInfoMessage); !ok {
			fail(what, "first message is %s, want ServerInfo", describe(m))
		}
		pass("%s: logged in (server key %v)", what, c.ServerPublicKey().ShortString())
	}
	pass("headscale-yaml: all checks")
}

// describeMap prints a DERPMap with its regions and nodes (not pointers).
func describeMap(dm *tailcfg.DERPMap) string {
	if dm == nil {
		return "<nil>"
	}
	s := fmt.Sprintf("DERPMap{HomeParams:%v OmitDefaultRegions:%v Regions:", dm.HomeParams, dm.OmitDefaultRegions)
	for id, r := range dm.Regions {
		if r == nil {
			s += fmt.Sprintf(" %d:<nil>", id)
			continue
		}
		s += fmt.Sprintf(" %d:{RegionID:%d RegionCode:%q RegionName:%q Latitude:%v Longitude:%v Avoid:%v NoMeasureNoHome:%v Nodes:[",
			id, r.RegionID, r.RegionCode, r.RegionName, r.Latitude, r.Longitude, r.Avoid, r.NoMeasureNoHome)
		for i, n := range r.Nodes {
			if i > 0 {
				s += " "
			}
			s += fmt.Sprintf("%+v", n)
		}
		s += "]}"
	}
	return s + "}"
}
