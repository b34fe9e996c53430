// Package faults is vblade-ha's Jepsen-style fault suite (issue 5): real
// `vblade node` processes in network namespaces, a verifying AoE workload
// whose every operation is recorded, a nemesis that crashes, pauses,
// partitions and starves the nodes at random times, and a checker that
// requires every block's history to be linearizable (porcupine) and every
// acknowledged write to survive.
//
//	make faults                        # CI-sized run (FAULTS_DURATION, default 10m)
//	LONG=1 FAULTS_DURATION=2h make faults
//	go test -run TestFaults ./test/faults/ -faults.duration=3m -v
//
// `go test ./...` runs it with a small default budget (-faults.duration,
// default 7m of nemesis time split over a 3-node and a 5-node cluster: about
// 100 faults in about 8 minutes); -short skips it. Needs root (network
// namespaces, tmpfs mounts) and nft (Debian package nftables). Every run prints a report and writes it to an artefact
// directory; a failing run keeps its history, fault timeline and node logs
// there (-faults.artifacts or $FAULTS_ARTIFACTS, default
// $TMPDIR/vblade-faults).
package faults

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/clustertest"
)

var (
	flagDuration  = flag.Duration("faults.duration", 0, "nemesis time of the whole suite, split over the cluster sizes (0: $FAULTS_DURATION, else 7m)")
	flagSizes     = flag.String("faults.nodes", "3,5", "cluster sizes to run, comma-separated")
	flagSeed      = flag.Uint64("faults.seed", 0, "random seed (0: from the clock; printed in the report)")
	flagWorkers   = flag.Int("faults.clients", 6, "concurrent workload clients")
	flagBlocks    = flag.Int("faults.blocks", 16, "blocks the workload reads and writes")
	flagArtifacts = flag.String("faults.artifacts", "", "artefact directory (default $FAULTS_ARTIFACTS, else $TMPDIR/vblade-faults)")
	flagKeep      = flag.Bool("faults.keep", false, "keep history and logs of a passing run too")
	flagNemesis   = flag.Bool("faults.nemesis", true, "inject faults (false: the workload and checker alone, a baseline)")
	flagMinRTO    = flag.Duration("faults.minrto", 0, "initiator MinRTO (0: the aoe.Client default); a large value all but stops retransmissions")
	flagMACMode   = flag.String("faults.macmode", "", "mac_mode for every cluster (default: virtual for 3 nodes, node for 5)")
)

const defaultDuration = 7 * time.Minute

func suiteDuration() time.Duration {
	if *flagDuration > 0 {
		return *flagDuration
	}
	if s := os.Getenv("FAULTS_DURATION"); s != "" {
		if d, err := time.ParseDuration(s); err == nil && d > 0 {
			return d
		}
	}
	return defaultDuration
}

func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP (-short): the fault suite runs real clusters for minutes")
	}
	total := suiteDuration()
	var sizes []int
	for _, s := range strings.Split(*flagSizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 3 || n > 9 || n%2 == 0 {
			t.Fatalf("-faults.nodes: %q is not an odd cluster size from 3 to 9", s)
		}
		sizes = append(sizes, n)
	}
	// A last-resort bound: every loop is bounded by its own deadline, this
	// only turns a wedged run into a crash with stacks instead of a hang.
	wd := time.AfterFunc(total+time.Duration(len(sizes))*8*time.Minute, func() {
		panic(fmt.Sprintf("fault suite watchdog: still running %v after start", total+time.Duration(len(sizes))*8*time.Minute))
	})
	defer wd.Stop()
	seed := *flagSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	weight := 0
	for _, n := range sizes {
		weight += n
	}
	for i, n := range sizes {
		d := total * time.Duration(n) / time.Duration(weight)
		mode := *flagMACMode
		if mode == "" {
			mode = "virtual"
			if n >= 5 {
				mode = "node"
			}
		}
		t.Run(fmt.Sprintf("%dnodes", n), func(t *testing.T) {
			runFaults(t, runConfig{size: n, duration: d, seed: seed + uint64(i), subnet: 83 + i, mode: mode})
		})
	}
}

type runConfig struct {
	size     int
	duration time.Duration
	seed     uint64
	subnet   int
	mode     string
}

// fault is one nemesis action on the timeline (times relative to run start).
type fault struct {
	Kind      string        `json:"kind"`
	Nodes     []string      `json:"nodes"`
	Start     int64         `json:"start"`
	Healed    int64         `json:"healed"`
	Recovered int64         `json:"recovered"`
	Recovery  time.Duration `json:"recovery"`
	Note      string        `json:"note,omitempty"`
}

const (
	kKillLeader    = "kill-leader"
	kKillFollower  = "kill-follower"
	kPauseLeader   = "pause-leader"
	kPauseFollower = "pause-follower"
	kPartLeader    = "partition-leader"
	kPartMinority  = "partition-minority"
	kCutInitiator  = "initiator-cut-from-leader"
	kLinkLeader    = "link-down-leader"
	kDiskFull      = "disk-full-follower"
)

var kinds = []struct {
	kind   string
	weight int
}{
	{kKillLeader, 3}, {kKillFollower, 2}, {kPauseLeader, 2}, {kPauseFollower, 1},
	{kPartLeader, 2}, {kPartMinority, 2}, {kCutInitiator, 2}, {kLinkLeader, 1}, {kDiskFull, 1},
}

type run struct {
	t        *testing.T
	cfg      runConfig
	c        *cluster
	rng      *rand.Rand
	rec      *recorder
	inits    []initiator
	faults   []fault
	problems []string // failures found while running (non-recovery, ENOSPC not reported...)
	probes   int      // probe blocks used

	tlMu     sync.Mutex
	timeline []string
	artDir   string
}

func (r *run) logf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	at := ""
	if r.rec != nil {
		at = ms(r.rec.now()) + " "
	}
	r.tlMu.Lock()
	r.timeline = append(r.timeline, at+msg)
	r.tlMu.Unlock()
	r.t.Log(at + msg)
}

func (r *run) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.problems = append(r.problems, msg)
	r.logf("PROBLEM: %s", msg)
}

func artifactsBase() string {
	if *flagArtifacts != "" {
		return *flagArtifacts
	}
	if d := os.Getenv("FAULTS_ARTIFACTS"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "vblade-faults")
}

func runFaults(t *testing.T, cfg runConfig) {
	r := &run{t: t, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.seed, 5))}
	r.artDir = filepath.Join(artifactsBase(), fmt.Sprintf("%s-%dnodes-%d", time.Now().Format("20060102-150405"), cfg.size, os.Getpid()))
	if err := os.MkdirAll(r.artDir, 0o755); err != nil {
		t.Fatal(err)
	}
	r.logf("fault run: %d nodes, mac_mode %s, nemesis for %v, seed %d, artefacts %s", cfg.size, cfg.mode, cfg.duration, cfg.seed, r.artDir)
	c := newCluster(t, cfg.size, cfg.subnet, cfg.mode, 2, r.logf)
	r.c = c
	t.Cleanup(func() {
		if t.Failed() {
			r.saveArtifacts(nil)
			fmt.Printf("FAULTS %dnodes FAILED: history, fault timeline and node logs kept in %s\n", cfg.size, r.artDir)
		}
	})
	c.form()

	// Initiators: one aoe.Client per root port, workers spread over them.
	for _, rp := range c.LAN.Root {
		cl, err := aoe.NewClient(rp.Name, aoe.ClientOptions{Follow: true, RequestTimeout: -1, MinRTO: *flagMinRTO, MaxRTO: max(500*time.Millisecond, *flagMinRTO)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		var infos []aoe.TargetInfo
		dctx, dcancel := context.WithTimeout(context.Background(), 15*time.Second)
		for dctx.Err() == nil && len(infos) == 0 {
			infos, _ = cl.Discover(dctx, 500*time.Millisecond)
		}
		dcancel()
		if len(infos) == 0 {
			t.Fatalf("discovery on %s found no target", rp.Name)
		}
		r.inits = append(r.inits, initiator{cl: cl, rem: aoe.Remote{Shelf: shelf, Slot: slotNo, MAC: infos[0].MAC, MaxSectors: 2, Window: 16}})
	}
	r.rec = &recorder{start: time.Now()}
	w := &workload{rec: r.rec, inits: r.inits, blocks: *flagBlocks, workers: *flagWorkers,
		timeout: 3 * time.Second, maxOps: 20_000_000}
	w.start(cfg.duration+5*time.Minute, cfg.seed)
	defer w.stop()
	if !r.waitOps(50, 20*time.Second) {
		t.Fatalf("workload makes no progress: %d ops recorded", len(r.rec.snapshot()))
	}

	// Nemesis.
	deadline := time.Now().Add(cfg.duration)
	for time.Now().Before(deadline) && len(r.problems) == 0 {
		if !*flagNemesis {
			time.Sleep(time.Until(deadline))
			break
		}
		time.Sleep(time.Duration(200+r.rng.IntN(800)) * time.Millisecond)
		r.inject(r.pick())
	}
	r.logf("nemesis done: %d faults", len(r.faults))

	// Heal everything (the nemesis heals each fault itself; this also
	// restarts anything left down), let the workload run on a healthy
	// cluster for a moment, stop it, then read every block back.
	for _, n := range c.Nodes {
		c.Resume(n)
		_ = c.healRaft(n)
		if !n.Running() {
			if err := c.Start(n); err != nil {
				r.problem("restart %s at the end: %v", n.ID, err)
			}
		}
	}
	_ = c.healInitiators()
	if d, err := c.waitHealthy(60 * time.Second); err != nil {
		r.problem("after healing everything: %v (evidence: %s)", err, r.evidence())
	} else {
		r.logf("healed: cluster healthy after %v", d.Round(time.Millisecond))
	}
	time.Sleep(time.Second)
	w.stop()
	final := r.readBack()
	hist := r.rec.snapshot()

	// Check.
	ct := time.Now()
	rep := check(hist, final, 2*time.Minute)
	r.logf("checked %d ops in %v", len(hist), time.Since(ct).Round(time.Millisecond))
	stall, stallAt, stallFault := r.longestStall(hist)
	report := r.report(rep, stall, stallAt, stallFault)
	fmt.Println(report)
	t.Log("\n" + report)
	_ = os.WriteFile(filepath.Join(r.artDir, "report.txt"), []byte(report+"\n"), 0o644)

	failed := false
	if rep.linearizable != "yes" {
		failed = true
		files := visualize(t, rep, r.artDir)
		for _, b := range rep.bad {
			t.Errorf("block %d is NOT linearizable (porcupine); visualisation %v", b.block, files)
		}
		for _, a := range rep.anomalies {
			t.Errorf("anomaly: %s", a)
		}
		if len(rep.bad) > 0 {
			b := rep.bad[0]
			at := b.breakAt
			t.Errorf("history of block %d around %s:\n%s", b.block, ms(at), historyExcerpt(hist, b.block, at, 3*time.Second))
			t.Errorf("faults around it:\n%s", r.faultsAround(at, 10*time.Second))
		}
	}
	if len(rep.lost) > 0 {
		failed = true
		for i, l := range rep.lost {
			if i >= 10 {
				break
			}
			t.Errorf("LOST WRITE: %s", l)
		}
	}
	for _, p := range r.problems {
		failed = true
		t.Errorf("%s", p)
	}
	if failed || t.Failed() {
		r.saveArtifacts(hist)
		t.Errorf("fault run failed: history, fault timeline and node logs kept in %s", r.artDir)
		return
	}
	if *flagKeep {
		r.saveArtifacts(hist)
	}
}

func (r *run) waitOps(n int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	base := len(r.rec.snapshot())
	for time.Now().Before(deadline) {
		ok := 0
		for _, o := range r.rec.snapshot()[base:] {
			if o.Outcome == okOutcome {
				ok++
			}
		}
		if ok >= n {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

func (r *run) pick() string {
	total := 0
	for _, k := range kinds {
		total += k.weight
	}
	x := r.rng.IntN(total)
	for _, k := range kinds {
		if x < k.weight {
			return k.kind
		}
		x -= k.weight
	}
	return kinds[0].kind
}

func (r *run) dur(minMs, maxMs int) time.Duration {
	return time.Duration(minMs+r.rng.IntN(maxMs-minMs+1)) * time.Millisecond
}

func (r *run) followers(l *clustertest.Node) []*clustertest.Node {
	var fs []*clustertest.Node
	for _, n := range r.c.Nodes {
		if n != l && n.Running() {
			fs = append(fs, n)
		}
	}
	return fs
}

// inject runs one fault from start to healed, then waits for recovery.
func (r *run) inject(kind string) {
	c := r.c
	l, _ := c.FindLeader(nil, 10*time.Second)
	if l == nil {
		r.problem("no serving leader before fault %s (evidence: %s)", kind, r.evidence())
		return
	}
	f := fault{Kind: kind, Start: r.rec.now()}
	var victims []*clustertest.Node
	switch kind {
	case kKillLeader, kPauseLeader, kPartLeader, kCutInitiator, kLinkLeader:
		victims = []*clustertest.Node{l}
	case kKillFollower, kPauseFollower, kDiskFull:
		fs := r.followers(l)
		victims = []*clustertest.Node{fs[r.rng.IntN(len(fs))]}
	case kPartMinority:
		perm := r.rng.Perm(len(c.Nodes))
		for _, i := range perm[:(len(c.Nodes)-1)/2] {
			victims = append(victims, c.Nodes[i])
		}
	}
	for _, v := range victims {
		f.Nodes = append(f.Nodes, v.ID)
	}
	r.logf("FAULT %d %s on %v (leader %s)", len(r.faults)+1, kind, f.Nodes, l.ID)
	var err error
	switch kind {
	case kKillLeader, kKillFollower:
		v := victims[0]
		c.Stop(v, syscall.SIGKILL)
		time.Sleep(r.dur(300, 2500))
		f.Healed = r.rec.now()
		err = c.Start(v)
	case kPauseLeader, kPauseFollower:
		v := victims[0]
		if err = c.Pause(v); err == nil {
			time.Sleep(r.dur(1000, 3000)) // > election timeout (500 ms)
			c.Resume(v)
		}
		f.Healed = r.rec.now()
	case kPartLeader:
		v := victims[0]
		if err = c.isolateRaft(v, nil); err == nil {
			time.Sleep(r.dur(1500, 3500))
			err = c.healRaft(v)
		}
		f.Healed = r.rec.now()
	case kPartMinority:
		var majority []*clustertest.Node
		for _, n := range c.Nodes {
			if !slices.Contains(victims, n) {
				majority = append(majority, n)
			}
		}
		for _, v := range victims {
			if e := c.isolateRaft(v, majority); e != nil && err == nil {
				err = e
			}
		}
		time.Sleep(r.dur(1500, 3500))
		for _, v := range victims {
			if e := c.healRaft(v); e != nil && err == nil {
				err = e
			}
		}
		f.Healed = r.rec.now()
	case kCutInitiator:
		roots := []int{1, 2}
		if r.rng.IntN(2) == 0 {
			roots = []int{1 + r.rng.IntN(2)}
		}
		f.Note = fmt.Sprintf("root ports %v", roots)
		if err = c.cutInitiators(victims[0], roots); err == nil {
			time.Sleep(r.dur(1000, 3000))
			err = c.healInitiators()
		}
		f.Healed = r.rec.now()
	case kLinkLeader:
		v := victims[0]
		c.LAN.LinkDown(v.NS)
		time.Sleep(r.dur(1500, 3000))
		c.LAN.LinkUp(v.NS)
		f.Healed = r.rec.now()
	case kDiskFull:
		f.Note, err = r.diskFull(victims[0])
		f.Healed = r.rec.now()
	}
	if err != nil {
		r.problem("fault %s on %v: %v", kind, f.Nodes, err)
	}
	d, herr := c.waitHealthy(45 * time.Second)
	f.Recovered = r.rec.now()
	f.Recovery = d
	r.faults = append(r.faults, f)
	if herr != nil {
		r.problem("after fault %s on %v the cluster did not recover: %v (evidence: %s)", kind, f.Nodes, herr, r.evidence())
		return
	}
	r.logf("recovered from %s in %v after heal", kind, d.Round(time.Millisecond))
}

// diskFull fills follower v's image filesystem, writes probe blocks to pages
// v has never allocated, and expects v to stop applying with a clear ENOSPC
// message while the cluster carries on; then frees the space and restarts v.
func (r *run) diskFull(v *clustertest.Node) (string, error) {
	c := r.c
	const n = 3
	if r.probes+n > maxProbes {
		return "probe pages used up", nil
	}
	first := r.probes
	r.probes += n
	if err := punchHoles(v, probeBase+int64(first)*probeStep, n*probeStep); err != nil {
		return "", fmt.Errorf("punch holes in %s: %w", v.Img, err)
	}
	filled, err := fill(v)
	if err != nil {
		_ = unfill(v)
		return "", err
	}
	before := r.okCount()
	for k := first; k < first+n; k++ {
		o := r.rec.do(context.Background(), r.inits[0], 900, probeBlock(k), true, 5*time.Second)
		if o.Outcome != okOutcome {
			r.logf("probe write %d: %s %s", k, o.Outcome, o.Err)
		}
	}
	var msg string
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if s, err := c.Status(v); err == nil && s.FatalError != "" {
			msg = s.FatalError
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The cluster must carry on without v.
	progress := r.waitOps(20, 10*time.Second)
	note := fmt.Sprintf("filled %d bytes; %d ops completed meanwhile", filled, r.okCount()-before)
	switch {
	case msg == "":
		r.problem("disk-full on %s: no fatal_error in its status 15 s after writes to unallocated pages of a full filesystem (log lines: %v)",
			v.ID, c.grepLogs(5, "no space", "ENOSPC", v.ID+" "))
	case !strings.Contains(msg, "no space left on device"):
		r.problem("disk-full on %s: the fatal error does not say the disk is full: %q", v.ID, msg)
	default:
		r.logf("%s stopped applying: %s", v.ID, msg)
	}
	if !progress {
		r.problem("disk-full on %s: the cluster made no progress while %s was out", v.ID, v.ID)
	}
	if err := unfill(v); err != nil {
		return note, err
	}
	c.Stop(v, syscall.SIGTERM)
	return note, c.Start(v)
}

func (r *run) okCount() int {
	n := 0
	for _, o := range r.rec.snapshot() {
		if o.Outcome == okOutcome {
			n++
		}
	}
	return n
}

// evidence summarises every node's status and the tail of its log.
func (r *run) evidence() string {
	var b strings.Builder
	for _, n := range r.c.Nodes {
		s, err := r.c.Status(n)
		js, _ := json.Marshal(s)
		fmt.Fprintf(&b, "\n  %s running=%v status=%s err=%v", n.ID, n.Running(), js, err)
	}
	return b.String()
}

// readBack reads every block the run touched, on the healed cluster.
func (r *run) readBack() []op {
	var blocks []int
	for b := 0; b < *flagBlocks; b++ {
		blocks = append(blocks, b)
	}
	for k := 0; k < r.probes; k++ {
		blocks = append(blocks, probeBlock(k))
	}
	var final []op
	for _, b := range blocks {
		var o op
		for try := 0; try < 10; try++ {
			o = r.rec.do(context.Background(), r.inits[try%len(r.inits)], 1000, b, false, 5*time.Second)
			if o.Outcome == okOutcome {
				break
			}
		}
		final = append(final, o)
	}
	return final
}

// longestStall is the longest gap between two consecutive successful
// completions (before the read-back), where it began, and the fault active
// then.
func (r *run) longestStall(hist []op) (time.Duration, int64, string) {
	var ts []int64
	for _, o := range hist {
		if o.Outcome == okOutcome && o.Client < 900 {
			ts = append(ts, o.Return)
		}
	}
	slices.Sort(ts)
	var best, at int64
	for i := 1; i < len(ts); i++ {
		if g := ts[i] - ts[i-1]; g > best {
			best, at = g, ts[i-1]
		}
	}
	which := "none"
	for _, f := range r.faults {
		if at >= f.Start-int64(time.Second) && at <= f.Recovered {
			which = fmt.Sprintf("%s on %v at %s", f.Kind, f.Nodes, ms(f.Start))
		}
	}
	return time.Duration(best), at, which
}

func (r *run) report(rep checkReport, stall time.Duration, stallAt int64, stallFault string) string {
	byKind := map[string]int{}
	var maxRec time.Duration
	for _, f := range r.faults {
		byKind[f.Kind]++
		maxRec = max(maxRec, f.Recovery)
	}
	var ks []string
	for k, n := range byKind {
		ks = append(ks, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(ks)
	el := time.Duration(r.rec.now())
	perMin := float64(len(r.faults)) / el.Minutes()
	var b strings.Builder
	fmt.Fprintf(&b, "==== FAULT REPORT: %d nodes, mac_mode %s, seed %d, %v of nemesis (%v in all)\n", r.cfg.size, r.cfg.mode, r.cfg.seed, r.cfg.duration, el.Round(time.Second))
	fmt.Fprintf(&b, "faults injected:    %d (%.1f/min): %s\n", len(r.faults), perMin, strings.Join(ks, " "))
	fmt.Fprintf(&b, "operations:         %d (ok %d, unknown %d, failed reads %d), %.0f ops/s\n", rep.ops, rep.acked, rep.unknown, rep.failed, float64(rep.ops)/el.Seconds())
	fmt.Fprintf(&b, "acknowledged writes: %d\n", rep.ackedWrites)
	fmt.Fprintf(&b, "lost writes:        %d\n", len(rep.lost))
	fmt.Fprintf(&b, "linearizable:       %s\n", rep.linearizable)
	fmt.Fprintf(&b, "longest stall:      %v at %s (during %s)\n", stall.Round(time.Millisecond), ms(stallAt), stallFault)
	fmt.Fprintf(&b, "slowest recovery:   %v (heal to healthy cluster)\n", maxRec.Round(time.Millisecond))
	var sent, retr, late uint64
	for _, in := range r.inits {
		st := in.cl.Stats()
		sent += st.FramesSent
		retr += st.Retransmits
		late += st.Late
	}
	fmt.Fprintf(&b, "initiator frames:   %d sent, %d retransmitted, %d late answers\n", sent, retr, late)
	fmt.Fprintf(&b, "problems:           %d\n", len(r.problems))
	fmt.Fprintf(&b, "artefacts:          %s", r.artDir)
	return b.String()
}

func (r *run) faultsAround(at int64, window time.Duration) string {
	var lines []string
	for _, f := range r.faults {
		if f.Recovered >= at-int64(window) && f.Start <= at+int64(window) {
			lines = append(lines, fmt.Sprintf("  %s on %v: start %s healed %s recovered %s %s", f.Kind, f.Nodes, ms(f.Start), ms(f.Healed), ms(f.Recovered), f.Note))
		}
	}
	return strings.Join(lines, "\n")
}

// saveArtifacts writes the history, the fault timeline and the node logs.
func (r *run) saveArtifacts(hist []op) {
	if hist == nil && r.rec != nil {
		hist = r.rec.snapshot()
	}
	if f, err := os.Create(filepath.Join(r.artDir, "history.jsonl")); err == nil {
		enc := json.NewEncoder(f)
		for _, o := range hist {
			_ = enc.Encode(o)
		}
		f.Close()
	}
	if b, err := json.MarshalIndent(r.faults, "", " "); err == nil {
		_ = os.WriteFile(filepath.Join(r.artDir, "faults.json"), b, 0o644)
	}
	r.tlMu.Lock()
	_ = os.WriteFile(filepath.Join(r.artDir, "timeline.log"), []byte(strings.Join(r.timeline, "\n")+"\n"), 0o644)
	r.tlMu.Unlock()
	if r.c != nil && r.c.LAN != nil {
		r.c.copyLogs(r.artDir)
	}
}
