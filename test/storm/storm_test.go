// Package storm runs a malformed-frame storm against a serving cluster
// leader while a verifying workload runs: the leader must stay up and keep
// leading, its memory must stay bounded, the workload must see no
// mismatch, and malformed frames must get the protocol's error reply or
// nothing.
//
// The three nodes are real `vblade node` processes (so the leader's VmRSS
// is its own) with mutual TLS on 127.0.0.1; AoE runs only on the
// root-namespace veths of a private netlab LAN, never on eth0.
//
// Knobs: STORM_FRAMES (default 200000) and STORM_SECONDS (default 20)
// bound the storm; the test stops at whichever comes first.
package storm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
	"github.com/vblade-ha/vblade-ha/node"
)

const (
	shelf     = 9
	slot      = 0
	imageSize = 16 << 20
	sectors   = imageSize / 512
	// The workload owns the lower half of the disk; well-formed storm
	// commands only ever address the upper half or beyond the end, so a
	// mismatch can only be a real bug.
	workloadSectors = sectors / 2
	rssLimitGrowth  = 64 << 20 // allowed VmRSS growth during the storm
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// stormConfig is every node's configuration besides its paths: mutual TLS,
// and a lenient heartbeat. The storm tests the frame path, not Raft's
// timing: a lenient heartbeat keeps a loaded CI machine from electing a new
// leader mid-run, which would only blur what this test measures (the fault
// suite covers elections).
var stormConfig = clustertest.Config{
	TLS:   true,
	Extra: "heartbeat_timeout = \"2s\"\nelection_timeout = \"2s\"\n",
	Shelf: shelf, Slot: slot,
}

// startNode writes n's zero-filled image and configuration, starts it and
// waits for its admin socket.
func startNode(c *clustertest.Cluster, n *clustertest.Node) {
	c.T.Helper()
	c.WriteImage(n, n.ID+".img", make([]byte, imageSize), 0)
	c.WriteConfig(n)
	c.MustStart(n)
}

func waitFor(t *testing.T, d time.Duration, what string, f func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !f(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Storm frame kinds. The kind is in the top byte of the tag, so answers
// can be classified.
const (
	kTruncated  = iota + 1 // cut anywhere, down to a bare Ethernet header
	kOversized             // ATA write with more data than its sector count (and jumbo-ish padding)
	kShortWrite            // ATA write with less data than its sector count: BadArg
	kBadVersion            // version nibble != 1
	kRandomATA             // random ATA command, flags and counts; LBA in the upper half or out of range
	kRandomCmd             // random AoE command byte and payload
	kSpoofed               // response flag set: must be ignored
	kRandomAddr            // random shelf/slot: filtered, nothing answers
	kinds
)

var kindNames = [...]string{"", "truncated", "oversized", "short-write", "bad-version", "random-ata", "random-cmd", "spoofed-response", "random-addr"}

func stormFrame(r *mrand.Rand, b []byte, dst, src aoe.MAC, seq uint32) (int, int) {
	k := 1 + r.IntN(kinds-1)
	h := aoe.Header{Dst: dst, Src: src, Version: aoe.Version, Shelf: shelf, Slot: slot, Command: aoe.CmdATA, Tag: uint32(k)<<24 | seq&0xffffff}
	upperLBA := func() uint64 {
		if r.IntN(4) == 0 {
			return uint64(sectors) + uint64(r.IntN(1<<20)) // out of range: IDNF
		}
		return uint64(workloadSectors + r.IntN(sectors-workloadSectors-16))
	}
	lba := upperLBA()
	if k == kShortWrite {
		// In range, so the only thing wrong is the length: BadArg.
		lba = uint64(workloadSectors + r.IntN(sectors-workloadSectors-16))
	}
	ata := func(cmd uint8, count uint8, data int) int {
		m := aoe.ATA{Header: h, AFlags: aoe.ATAFlagExtended | aoe.ATAFlagWrite, SectorCount: count, CmdStatus: cmd, LBA: lba, Data: b[aoe.ATAHeaderLen : aoe.ATAHeaderLen+data]}
		n, _ := m.Marshal(b)
		return n
	}
	n := 0
	switch k {
	case kTruncated:
		n = ata(0x34, 2, 1024)
		n = aoe.EthernetHeaderLen + r.IntN(aoe.ATAHeaderLen-aoe.EthernetHeaderLen)
	case kOversized:
		n = ata(0x34, 1, 512+r.IntN(len(b)-aoe.ATAHeaderLen-512))
	case kShortWrite:
		n = ata(0x34, 2, 512) // two sectors announced, one sent
	case kBadVersion:
		n = ata(0x24, 1, 0)
		b[14] = byte(2+r.IntN(14))<<4 | b[14]&0x0f
	case kRandomATA:
		cmd := uint8(r.IntN(256))
		n = ata(cmd, uint8(r.IntN(3)), 512*r.IntN(3))
		b[24] = byte(r.IntN(256)) &^ 0x01 // any flags; async bit off keeps answers comparable
	case kRandomCmd:
		h.Command = aoe.Command(r.IntN(256))
		h.Marshal(b)
		n = aoe.HeaderLen + r.IntN(200)
		for i := aoe.HeaderLen; i < n; i++ {
			b[i] = byte(r.IntN(256))
		}
		// Never a valid mask edit or reservation that would lock the
		// workload out (that is the initiators' own business, not a
		// malformed frame): zeroing the sub-command header leaves only the
		// read sub-commands of Query Config, Mac Mask List and Reserve.
		if h.Command == aoe.CmdMaskList || h.Command == aoe.CmdReserve || h.Command == aoe.CmdQueryConfig {
			clear(b[aoe.HeaderLen : aoe.HeaderLen+8])
		}
	case kSpoofed:
		n = ata(0x24, 1, 512) // a read "response"
		b[14] |= aoe.FlagResponse
	case kRandomAddr:
		n = ata(0x24, 1, 0)
		binary.BigEndian.PutUint16(b[16:18], uint16(r.IntN(0xfffe)))
		if binary.BigEndian.Uint16(b[16:18]) == shelf {
			b[16] ^= 0x80
		}
		b[18] = byte(r.IntN(0xff))
	}
	if n < aoe.EthernetHeaderLen {
		n = aoe.EthernetHeaderLen
	}
	return n, k
}

func TestStormAgainstLeader(t *testing.T) {
	netlab.RequireRoot(t)
	maxFrames := envInt("STORM_FRAMES", 200000)
	maxTime := time.Duration(envInt("STORM_SECONDS", 20)) * time.Second
	// The nodes run in the root namespace on root ports 0-2 (Raft on
	// 127.0.0.1); port 3 is the workload's, port 4 the storm's.
	c := clustertest.New(t, clustertest.Options{Nodes: 3, RootPorts: 5, RootNamespace: true, Config: stormConfig, DumpLines: 20})
	lan := c.LAN
	n1 := c.Node(1)
	startNode(c, n1)
	c1 := node.NewAdminClient(n1.Sock)
	if err := c1.Init(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	var leaderAddr string
	waitFor(t, 20*time.Second, "n1 leads and serves", func() bool {
		s, err := c1.Status(context.Background())
		if err == nil {
			leaderAddr = s.Address
		}
		return err == nil && s.State == "leader" && len(s.Targets) == 1 && s.Targets[0].Serving
	})
	for _, n := range c.Nodes[1:] {
		startNode(c, n)
		ac := node.NewAdminClient(n.Sock)
		res, err := ac.Join(ctxT(t, time.Minute), leaderAddr)
		if err != nil {
			t.Fatalf("%s join: %v", n.ID, err)
		}
		if _, err := ac.WaitCaughtUp(ctxT(t, time.Minute), res.CommitIndex, 50*time.Millisecond, nil); err != nil {
			t.Fatalf("%s catch up: %v", n.ID, err)
		}
	}
	st0, _ := c1.Status(context.Background())
	pid := n1.Cmd().Process.Pid

	// The verifying workload, on its own port.
	cl, err := aoe.NewClient(lan.Root[3].Name, aoe.ClientOptions{Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var remote aoe.Remote
	waitFor(t, 10*time.Second, "target discovered", func() bool {
		ts, err := cl.Discover(context.Background(), 500*time.Millisecond)
		for _, ti := range ts {
			if ti.Shelf == shelf && ti.Slot == slot {
				remote = ti.Remote()
				return true
			}
		}
		_ = err
		return false
	})

	storm, err := aoe.Listen(lan.Root[4].Name, aoe.ListenConfig{ReadBuffer: 8 << 20, WriteBuffer: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer storm.Close()

	rss0, err := vmRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), maxTime+30*time.Second)
	defer cancel()
	stormDone := make(chan struct{})

	// Answers to storm frames, by kind: [kind][0]=ok, [1]=AoE error, with
	// the error codes seen.
	var answers [kinds][2]atomic.Int64
	var codes [kinds][8]atomic.Int64
	var ataErrs [kinds]atomic.Int64 // AoE-ok answers with ATA status ERR (ABRT, IDNF)
	go func() {
		b := make([]byte, 9216)
		me := storm.MAC()
		for {
			storm.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, err := storm.ReadFrame(b)
			select {
			case <-ctx.Done():
				return
			default:
			}
			if err != nil || n < aoe.HeaderLen {
				continue
			}
			var h aoe.Header
			if h.Unmarshal(b[:n]) != nil || h.Src == me || !h.IsResponse() || !bytes.Equal(h.Dst[:], me[:]) {
				continue
			}
			k := int(h.Tag >> 24)
			if k <= 0 || k >= kinds {
				continue
			}
			if h.Command == aoe.CmdATA && !h.IsError() && n >= aoe.ATAHeaderLen && b[27]&aoe.ATAStatusError != 0 {
				ataErrs[k].Add(1)
			}
			if h.IsError() {
				answers[k][1].Add(1)
				codes[k][min(int(h.Error), 7)].Add(1)
			} else {
				answers[k][0].Add(1)
			}
		}
	}()

	// Workload: writers on disjoint regions of the lower half, each write
	// read back and compared; a final pass re-reads everything.
	const workers, blk = 4, 8 // 8 sectors per op
	var ops, mismatches, ioErrs atomic.Int64
	models := make([]map[uint64][]byte, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		models[w] = map[uint64][]byte{}
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			region := uint64(workloadSectors / workers)
			r := mrand.New(mrand.NewPCG(uint64(w), 1))
			for {
				select {
				case <-stormDone:
					return
				default:
				}
				lba := uint64(w)*region + uint64(r.IntN(int(region/blk)))*blk
				data := make([]byte, blk*512)
				rand.Read(data)
				octx, ocancel := context.WithTimeout(ctx, 20*time.Second)
				err := cl.WriteAt(octx, remote, data, lba)
				if err == nil {
					models[w][lba] = data
					got := make([]byte, len(data))
					if err = cl.ReadAt(octx, remote, got, lba); err == nil && !bytes.Equal(got, data) {
						mismatches.Add(1)
						t.Errorf("worker %d: read-back of LBA %d differs from what was written", w, lba)
					}
				}
				ocancel()
				if err != nil {
					// An unacknowledged write may or may not have landed:
					// forget the block rather than guess.
					delete(models[w], lba)
					ioErrs.Add(1)
					t.Logf("worker %d: I/O error at LBA %d: %v", w, lba, err)
				}
				ops.Add(1)
			}
		}(w)
	}

	// Memory sampler.
	var rssMax atomic.Int64
	rssMax.Store(rss0)
	go func() {
		for {
			select {
			case <-stormDone:
				return
			case <-time.After(250 * time.Millisecond):
			}
			if v, err := vmRSS(pid); err == nil && v > rssMax.Load() {
				rssMax.Store(v)
			}
		}
	}()

	// The storm: to the target's MAC and to broadcast, as fast as the
	// socket takes them, bounded in count and time.
	r := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 7))
	buf := make([]byte, 9216)
	var sent [kinds]int64
	var sendErrs int64
	start := time.Now()
	total := 0
	for ; total < maxFrames && time.Since(start) < maxTime; total++ {
		dst := remote.MAC
		if dst == (aoe.MAC{}) || r.IntN(8) == 0 {
			dst = aoe.BroadcastMAC
		}
		clear(buf[:aoe.ATAHeaderLen+1024])
		n, k := stormFrame(r, buf, dst, storm.MAC(), uint32(total))
		if n > storm.MTU()+aoe.EthernetHeaderLen {
			n = storm.MTU() + aoe.EthernetHeaderLen
		}
		if err := storm.WriteFrame(buf[:n]); err != nil {
			sendErrs++
			time.Sleep(time.Millisecond) // socket buffer full: back off
			continue
		}
		sent[k]++
		// Pace to the budget: maxFrames over maxTime.
		if want := time.Duration(float64(total) / float64(maxFrames) * float64(maxTime)); time.Since(start) < want {
			time.Sleep(want - time.Since(start))
		}
	}
	stormTime := time.Since(start)
	time.Sleep(time.Second) // late answers
	close(stormDone)
	wg.Wait()

	// Final read-back of every block the workload acknowledged.
	for w := 0; w < workers; w++ {
		for lba, want := range models[w] {
			got := make([]byte, len(want))
			if err := cl.ReadAt(ctxT(t, 20*time.Second), remote, got, lba); err != nil {
				t.Errorf("final read of LBA %d: %v", lba, err)
			} else if !bytes.Equal(got, want) {
				mismatches.Add(1)
				t.Errorf("final read of LBA %d differs from the acknowledged write", lba)
			}
		}
	}
	cancel()

	// Verdicts.
	if ex, _ := lan.Exited(n1.Cmd()); ex {
		t.Fatalf("the leader's process exited during the storm")
	}
	st1, err := c1.Status(context.Background())
	if err != nil {
		t.Fatalf("leader status after the storm: %v", err)
	}
	if st1.State != "leader" || st1.Term != st0.Term {
		// Not a storm failure by itself (the process stayed up and the
		// workload's verdict below is what counts), but worth seeing.
		t.Logf("leadership moved during the storm: n1 %s, term %d -> %d", st1.State, st0.Term, st1.Term)
	}
	growth := rssMax.Load() - rss0
	t.Logf("storm: %d frames in %v (%d send errors); leader VmRSS %d MiB before, %d MiB peak (+%d MiB)",
		total, stormTime.Round(time.Millisecond), sendErrs, rss0>>20, rssMax.Load()>>20, growth>>20)
	if growth > rssLimitGrowth {
		t.Errorf("leader VmRSS grew by %d MiB during the storm (limit %d MiB)", growth>>20, rssLimitGrowth>>20)
	}
	t.Logf("workload: %d ops, %d I/O errors, %d mismatches", ops.Load(), ioErrs.Load(), mismatches.Load())
	if mismatches.Load() != 0 {
		t.Errorf("%d mismatches", mismatches.Load())
	}
	if ops.Load() < 100 {
		t.Errorf("workload made only %d operations during the storm: the target was starved", ops.Load())
	}
	for k := 1; k < kinds; k++ {
		var cs []string
		for c := 0; c < 8; c++ {
			if v := codes[k][c].Load(); v > 0 {
				cs = append(cs, fmt.Sprintf("%v=%d", aoe.ErrorCode(c), v))
			}
		}
		t.Logf("%-16s sent %6d  AoE-ok answers %6d (ATA ERR %6d)  AoE error answers %6d %v", kindNames[k], sent[k], answers[k][0].Load(), ataErrs[k].Load(), answers[k][1].Load(), cs)
	}
	// Spot checks of what the protocol says.
	if a := answers[kSpoofed][0].Load() + answers[kSpoofed][1].Load(); a != 0 {
		t.Errorf("%d answers to response-flagged frames; a target must ignore responses", a)
	}
	if a := answers[kRandomAddr][0].Load() + answers[kRandomAddr][1].Load(); a != 0 {
		t.Errorf("%d answers to frames for shelf.slot values not served", a)
	}
	if answers[kShortWrite][1].Load() == 0 || answers[kShortWrite][0].Load() != 0 || codes[kShortWrite][aoe.ErrCodeBadArg].Load() != answers[kShortWrite][1].Load() {
		t.Errorf("short ATA writes: want only BadArg answers, got %d ok, %d errors (%d BadArg)",
			answers[kShortWrite][0].Load(), answers[kShortWrite][1].Load(), codes[kShortWrite][aoe.ErrCodeBadArg].Load())
	}
	if a := answers[kTruncated][0].Load(); a != 0 {
		t.Errorf("%d success answers to truncated frames", a)
	}
}
