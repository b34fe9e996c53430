package node

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// requireRoot skips (loudly) where raw sockets and veth pairs are not
// available; CI runs as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root (CAP_NET_ADMIN for a veth pair, CAP_NET_RAW for AoE sockets); run `sudo go test ./node` or `make test` as root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIP: the ip command (iproute2) is missing: apt-get install -y iproute2")
	}
}

// newVethPair creates a veth pair with names of its own (never an existing
// interface), brings both ends up and deletes it when the test ends.
func newVethPair(t *testing.T) (a, b string) {
	t.Helper()
	var r [3]byte
	rand.Read(r[:])
	id := hex.EncodeToString(r[:])
	a, b = "vbma"+id, "vbmb"+id
	if out, err := exec.Command("ip", "link", "add", a, "type", "veth", "peer", "name", b).CombinedOutput(); err != nil {
		t.Skipf("SKIP: cannot create a veth pair here: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", a).Run() })
	for _, n := range []string{a, b} {
		// No IPv6 chatter on a wire that carries only AoE.
		os.WriteFile("/proc/sys/net/ipv6/conf/"+n+"/disable_ipv6", []byte("1"), 0)
		if out, err := exec.Command("ip", "link", "set", n, "up").CombinedOutput(); err != nil {
			t.Fatalf("ip link set %s up: %v: %s", n, err, out)
		}
	}
	return a, b
}

// scrape fetches url and returns every sample as "name{k="v",...}" (labels
// sorted, as the text format writes them) -> value.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape %s: %s: %s", url, resp.Status, b)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func sample(t *testing.T, m map[string]float64, key string) float64 {
	t.Helper()
	v, ok := m[key]
	if !ok {
		var near []string
		name, _, _ := strings.Cut(key, "{")
		for k := range m {
			if strings.HasPrefix(k, name) {
				near = append(near, k)
			}
		}
		t.Fatalf("metric %s missing; have %v", key, near)
	}
	return v
}

func startMetrics(t *testing.T, ctx context.Context, c *Collector) string {
	t.Helper()
	reg, err := NewMetricsRegistry(c)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveMetrics(ctx, ln, reg) }()
	t.Cleanup(func() {
		if err := <-done; err != nil {
			t.Errorf("metrics server: %v", err)
		}
	})
	return "http://" + ln.Addr().String() + "/metrics"
}

// TestMetricsStandaloneScrape runs a standalone target on one end of a veth
// pair, drives reads, writes, a flush and an out-of-range read through the
// initiator on the other end, and checks that the scraped counters moved by
// what was done.
func TestMetricsStandaloneScrape(t *testing.T) {
	requireRoot(t)
	tgtIf, iniIf := newVethPair(t)
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	const size = 16 << 20
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	e := Export{Shelf: 7, Slot: 3, Netif: tgtIf, Path: img, BufCount: 16}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	coll := NewCollector()
	// The same wiring Standalone.Run does, with the server kept so its
	// frame counters can be collected.
	s := &Standalone{Exports: []Export{e}}
	tgt, closer, err := s.openTarget(&s.Exports[0], nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	srv, err := aoe.NewServer(aoe.ServerConfig{Interface: tgtIf, BufferCount: e.BufCount})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := srv.AddTarget(tgt); err != nil {
		t.Fatal(err)
	}
	coll.AddServer(srv)
	coll.AddTarget(tgtIf, tgt)
	observe := coll.LatencyObserver(tgtIf, tgt.Addr())
	url := startMetrics(t, ctx, coll)
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.Serve(ctx) }()
	defer func() {
		cancel()
		if err := <-serveDone; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()

	before := scrape(t, url)
	tl := fmt.Sprintf(`netif=%q,target="e7.3"`, tgtIf)
	if v := sample(t, before, `vblade_target_commands_total{kind="write",`+tl+`}`); v != 0 {
		t.Fatalf("writes before any I/O = %v", v)
	}
	if v := sample(t, before, `vblade_target_size_bytes{`+tl+`}`); v != size {
		t.Errorf("size = %v, want %d", v, size)
	}

	cl, err := aoe.NewClient(iniIf, aoe.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ictx, icancel := context.WithTimeout(ctx, 20*time.Second)
	defer icancel()
	var remote aoe.Remote
	for remote.MAC == (aoe.MAC{}) {
		ts, err := cl.Discover(ictx, 200*time.Millisecond)
		if err != nil {
			t.Fatalf("discover on %s: %v", iniIf, err)
		}
		for _, ti := range ts {
			if ti.Shelf == 7 && ti.Slot == 3 {
				remote = ti.Remote()
			}
		}
	}
	const chunk = 64 << 10
	buf := make([]byte, chunk)
	rand.Read(buf)
	const rounds = 8
	for i := 0; i < rounds; i++ {
		start := time.Now()
		if err := cl.WriteAt(ictx, remote, buf, uint64(i*chunk/aoe.SectorSize)); err != nil {
			t.Fatalf("write: %v", err)
		}
		observe(aoe.KindWrite, time.Since(start))
	}
	got := make([]byte, chunk)
	for i := 0; i < rounds; i++ {
		if err := cl.ReadAt(ictx, remote, got, uint64(i*chunk/aoe.SectorSize)); err != nil {
			t.Fatalf("read: %v", err)
		}
	}
	if err := cl.Flush(ictx, remote); err != nil {
		t.Fatalf("flush: %v", err)
	}
	// Past the end: the target answers IDNF, an ATA error.
	if err := cl.ReadAt(ictx, remote, got[:aoe.SectorSize], size/aoe.SectorSize+10); err == nil {
		t.Fatal("read past the end succeeded")
	}

	after := scrape(t, url)
	// ATA counters count frames: each 64 KiB transfer is split by the MTU.
	frames := float64(rounds * ((chunk/aoe.SectorSize + remote.MaxSectors - 1) / remote.MaxSectors))
	if remote.MaxSectors == 0 {
		t.Fatal("discovered target has no sector count")
	}
	checks := []struct {
		key string
		min float64
	}{
		{`vblade_target_commands_total{kind="write",` + tl + `}`, frames},
		{`vblade_target_commands_total{kind="read",` + tl + `}`, frames},
		{`vblade_target_commands_total{kind="flush",` + tl + `}`, 1},
		{`vblade_target_bytes_total{direction="write",` + tl + `}`, rounds * chunk},
		{`vblade_target_bytes_total{direction="read",` + tl + `}`, rounds * chunk},
		{`vblade_target_ata_errors_total{` + tl + `}`, 1},
		{fmt.Sprintf(`vblade_interface_frames_received_total{netif=%q}`, tgtIf), 2*frames + 2},
		{fmt.Sprintf(`vblade_interface_frames_sent_total{netif=%q}`, tgtIf), 2*frames + 2},
		{`vblade_target_command_duration_seconds_count{kind="write",` + tl + `}`, rounds},
	}
	for _, c := range checks {
		if v := sample(t, after, c.key); v < c.min {
			t.Errorf("%s = %v, want >= %v", c.key, v, c.min)
		}
	}
	if v := sample(t, after, `vblade_target_serving{`+tl+`}`); v != 1 {
		t.Errorf("standalone target not serving: %v", v)
	}
	sample(t, after, fmt.Sprintf(`vblade_interface_kernel_drops_total{netif=%q}`, tgtIf))
	sample(t, after, `go_goroutines`)
}

// TestServeMetricsBusyPort checks that a metrics_addr that cannot be bound is
// reported at once with what to do, not logged and ignored.
func TestServeMetricsBusyPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	reg, _ := NewMetricsRegistry(NewCollector())
	err = ServeMetrics(context.Background(), ln.Addr().String(), reg)
	if err == nil || !strings.Contains(err.Error(), "metrics_addr") {
		t.Fatalf("ServeMetrics on a busy port: %v", err)
	}
}

// TestMetricsCollectorConsistent gathers an empty and a populated collector
// through the registry, which rejects inconsistent descriptors.
func TestMetricsCollectorConsistent(t *testing.T) {
	c := NewCollector()
	obs := c.LatencyObserver("eth9", aoe.TargetAddr{Shelf: 1, Slot: 2})
	obs(aoe.KindRead, time.Millisecond)
	obs(aoe.CommandKind(9), time.Millisecond) // unknown kinds count as other
	reg, err := NewMetricsRegistry(c)
	if err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	re := regexp.MustCompile(`^(vblade|go|process)_`)
	var sawHist bool
	for _, mf := range mfs {
		if !re.MatchString(mf.GetName()) {
			t.Errorf("unexpected metric family %s", mf.GetName())
		}
		if mf.GetName() == "vblade_target_command_duration_seconds" {
			sawHist = true
			if n := len(mf.GetMetric()); n != 4 {
				t.Errorf("%d latency series, want one per kind (4)", n)
			}
		}
	}
	if !sawHist {
		t.Error("latency histogram not gathered")
	}
}

// TestNodeReadyAndRaftMetrics bootstraps a one-node cluster, checks that
// NotifyWhenReady sends READY=1 to a NOTIFY_SOCKET of our own once the node
// leads and has applied its log, and that the Raft figures are exported.
func TestNodeReadyAndRaftMetrics(t *testing.T) {
	requireRoot(t)
	tgtIf, _ := newVethPair(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	// A systemd stand-in: READY=1 and STATUS= arrive as datagrams here.
	sockPath := filepath.Join(dir, "notify.sock")
	nsock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nsock.Close()
	t.Setenv("NOTIFY_SOCKET", sockPath)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raftAddr := ln.Addr().String()
	ln.Close()
	cfg := &Config{NodeID: "m1", DataDir: filepath.Join(dir, "data"), RaftAddr: raftAddr, Insecure: true,
		Exports: []Export{{Shelf: 9, Slot: 1, Netif: tgtIf, Path: img, BufCount: 16}}}
	n, err := NewNode(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown(false)
	if ok, why := n.Ready(); ok || !strings.Contains(why, "vbladectl cluster init") {
		t.Errorf("fresh node: ready=%v %q, want not ready with a hint to init or join", ok, why)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	url := startMetrics(t, ctx, n.MetricsCollector())
	runDone := make(chan error, 1)
	go func() { runDone <- n.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-runDone; err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	notified := make(chan struct{})
	go func() {
		n.NotifyWhenReady(ctx)
		close(notified)
	}()
	if err := n.Bootstrap(); err != nil {
		t.Fatal(err)
	}
	var msgs []string
	nsock.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 4096)
	for {
		k, err := nsock.Read(buf)
		if err != nil {
			t.Fatalf("no READY=1 within 20s; got %q (%v)", msgs, err)
		}
		msgs = append(msgs, string(buf[:k]))
		if string(buf[:k]) == "READY=1" {
			break
		}
	}
	<-notified
	if ok, why := n.Ready(); !ok {
		t.Fatalf("READY=1 sent but Ready() = false: %s", why)
	}
	m := scrape(t, url)
	if v := sample(t, m, `vblade_raft_state{state="leader"}`); v != 1 {
		t.Errorf("raft_state leader = %v", v)
	}
	if v := sample(t, m, `vblade_raft_term`); v < 1 {
		t.Errorf("term = %v", v)
	}
	if v := sample(t, m, `vblade_raft_leadership_changes_total`); v < 1 {
		t.Errorf("leadership changes = %v", v)
	}
	if v := sample(t, m, `vblade_node_ready`); v != 1 {
		t.Errorf("node_ready = %v", v)
	}
	if c, a := sample(t, m, `vblade_raft_commit_index`), sample(t, m, `vblade_raft_applied_index`); c < 1 || a < c {
		t.Errorf("commit %v applied %v", c, a)
	}
	sample(t, m, `vblade_raft_apply_lag_entries`)
	sample(t, m, `vblade_raft_servers`)
	sample(t, m, fmt.Sprintf(`vblade_target_commands_total{kind="read",netif=%q,target="e9.1"}`, tgtIf))
}
