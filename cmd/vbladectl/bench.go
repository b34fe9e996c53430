package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/vblade-ha/vblade-ha/aoe"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name:  "bench",
		Usage: "load an AoE target with N commands in flight and report IOPS, MB/s and latency",
		Description: "Each of -window workers keeps one command outstanding, so the target sees exactly\n" +
			"-window commands in flight. -verify writes blocks whose content encodes lba and generation\n" +
			"and checks every read against the last acknowledged write of that block. The longest stall\n" +
			"(gap between two consecutive completions) is reported with its wall-clock bounds.",
		ArgsUsage: " ",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "i", Aliases: []string{"interface"}, Usage: "network interface", Required: true},
			&cli.StringFlag{Name: "t", Aliases: []string{"target"}, Usage: "target as shelf.slot", Required: true},
			&cli.StringFlag{Name: "mode", Value: "randread", Usage: "randread|randwrite|seqread|seqwrite|mixed"},
			&cli.IntFlag{Name: "window", Value: 16, Usage: "commands in flight"},
			&cli.DurationFlag{Name: "duration", Value: 10 * time.Second, Usage: "how long to run"},
			&cli.Int64Flag{Name: "count", Usage: "stop after this many operations (0: duration only)"},
			&cli.IntFlag{Name: "bs", Usage: "sectors per operation (default: the target's scnt, one frame)"},
			&cli.Int64Flag{Name: "span", Usage: "bytes of the target to use from offset 0 (default: all)"},
			&cli.IntFlag{Name: "rwmix", Value: 50, Usage: "percentage of reads in mixed mode"},
			&cli.BoolFlag{Name: "verify", Usage: "write self-describing patterns and check every read"},
			&cli.BoolFlag{Name: "json", Usage: "print the summary as JSON"},
			&cli.StringFlag{Name: "mac", Usage: "send to this MAC (default: the first that answers discovery)"},
			&cli.BoolFlag{Name: "follow", Usage: "follow the target to a new MAC (cluster failover)"},
			&cli.DurationFlag{Name: "request-timeout", Value: 10 * time.Second, Usage: "give up one command after this long"},
			&cli.DurationFlag{Name: "rto", Usage: "fixed retransmit timeout (default: adaptive)"},
			&cli.DurationFlag{Name: "min-rto", Value: 20 * time.Millisecond, Usage: "floor of the adaptive retransmit timeout"},
			&cli.DurationFlag{Name: "wait", Value: time.Second, Usage: "how long discovery waits for the target"},
		},
		OnUsageError: usageError,
		Action:       benchAction,
	}
}

type benchConfig struct {
	mode     string
	window   int
	duration time.Duration
	count    int64
	bs       int // sectors
	blocks   uint64
	rwmix    int
	verify   bool
	remote   aoe.Remote
}

// benchResult is the summary, printed as text or JSON.
type benchResult struct {
	Target          string   `json:"target"`
	MAC             string   `json:"mac"`
	Mode            string   `json:"mode"`
	Window          int      `json:"window"`
	BlockSectors    int      `json:"bs_sectors"`
	SpanBytes       int64    `json:"span_bytes"`
	Seconds         float64  `json:"seconds"`
	Ops             int64    `json:"ops"`
	Reads           int64    `json:"reads"`
	Writes          int64    `json:"writes"`
	Bytes           int64    `json:"bytes"`
	IOPS            float64  `json:"iops"`
	MBps            float64  `json:"mb_per_s"`
	LatP50us        float64  `json:"lat_p50_us"`
	LatP99us        float64  `json:"lat_p99_us"`
	LatMaxus        float64  `json:"lat_max_us"`
	Retransmits     uint64   `json:"retransmits"`
	Timeouts        uint64   `json:"timeouts"`
	Late            uint64   `json:"late_responses"`
	Errors          int64    `json:"errors"`
	FirstErrors     []string `json:"first_errors,omitempty"`
	Verified        int64    `json:"verified"`
	Unverified      int64    `json:"unverified"`
	Mismatches      int64    `json:"mismatches"`
	FirstMismatches []string `json:"first_mismatches,omitempty"`
	StallMs         float64  `json:"longest_stall_ms"`
	StallStart      string   `json:"longest_stall_start,omitempty"`
	StallEnd        string   `json:"longest_stall_end,omitempty"`
}

func benchAction(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usagef("bench takes no arguments, got %q", c.Args().Slice())
	}
	addr, err := parseTarget(c.String("t"))
	if err != nil {
		return usagef("%v", err)
	}
	cfg := benchConfig{
		mode: c.String("mode"), window: c.Int("window"), duration: c.Duration("duration"),
		count: c.Int64("count"), bs: c.Int("bs"), rwmix: c.Int("rwmix"), verify: c.Bool("verify"),
	}
	switch cfg.mode {
	case "randread", "randwrite", "seqread", "seqwrite", "mixed":
	default:
		return usagef("-mode %q: want randread, randwrite, seqread, seqwrite or mixed", cfg.mode)
	}
	if cfg.window < 1 || cfg.window > 4096 {
		return usagef("-window %d: want 1-4096", cfg.window)
	}
	if cfg.duration <= 0 || cfg.duration > 24*time.Hour {
		return usagef("-duration %v: want more than 0 and at most 24h", cfg.duration)
	}
	if cfg.count < 0 || cfg.bs < 0 || c.Int64("span") < 0 || cfg.rwmix < 0 || cfg.rwmix > 100 {
		return usagef("-count, -bs, -span must not be negative, -rwmix must be 0-100")
	}
	var mac aoe.MAC
	if s := c.String("mac"); s != "" {
		if mac, err = aoe.ParseMAC(s); err != nil {
			return usagef("-mac %q: %v", s, err)
		}
	}
	client, err := aoe.NewClient(c.String("i"), aoe.ClientOptions{
		Follow:         c.Bool("follow"),
		RequestTimeout: c.Duration("request-timeout"),
		Timeout:        c.Duration("rto"),
		MinRTO:         c.Duration("min-rto"),
		MaxOutstanding: max(256, 2*cfg.window),
	})
	if err != nil {
		return cli.Exit(err, exitFail)
	}
	defer client.Close()

	// Ctrl-C ends the run early but still prints the summary.
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()

	info, err := findTarget(ctx, client, addr, mac, c.Duration("wait"))
	if err != nil {
		return cli.Exit(err, exitFail)
	}
	cfg.remote = info.Remote()
	cfg.remote.Window = 1 // one frame per worker: -window workers = -window frames
	scnt := min(int(info.SectorCount), client.MaxSectors())
	if cfg.bs == 0 {
		cfg.bs = scnt
	}
	if cfg.bs > scnt {
		// Several frames per operation; keep them all in flight.
		cfg.remote.Window = (cfg.bs + scnt - 1) / scnt
	}
	id, err := client.Identify(ctx, cfg.remote)
	if err != nil {
		return cli.Exit(fmt.Errorf("identify %s: %w", addr, err), exitFail)
	}
	span := id.Size()
	if s := c.Int64("span"); s > 0 {
		if s > span {
			return usagef("-span %d exceeds the target's size %d", s, span)
		}
		span = s
	}
	cfg.blocks = uint64(span) / uint64(cfg.bs*aoe.SectorSize)
	if cfg.blocks < uint64(cfg.window) {
		return usagef("span of %d bytes holds %d blocks of %d sectors: fewer than -window %d",
			span, cfg.blocks, cfg.bs, cfg.window)
	}
	if cfg.verify && (cfg.mode == "randread" || cfg.mode == "seqread") {
		fmt.Fprintln(os.Stderr, "vbladectl: note: -verify with a read-only mode checks only blocks written during this run (none)")
	}

	before := client.Stats()
	res := runBench(ctx, client, cfg, progressWriter())
	after := client.Stats()
	res.Target, res.MAC, res.SpanBytes = addr.String(), info.MAC.String(), span
	res.Retransmits = after.Retransmits - before.Retransmits
	res.Timeouts = after.Timeouts - before.Timeouts
	res.Late = after.Late - before.Late

	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		printBench(os.Stdout, res)
	}
	if res.Errors > 0 || res.Mismatches > 0 {
		return cli.Exit(fmt.Sprintf("%d errors, %d mismatches", res.Errors, res.Mismatches), exitFail)
	}
	return nil
}

// findTarget discovers addr and returns the answer from mac (or the first).
func findTarget(ctx context.Context, client *aoe.Client, addr aoe.TargetAddr, mac aoe.MAC, wait time.Duration) (aoe.TargetInfo, error) {
	infos, err := client.Discover(ctx, wait)
	if err != nil {
		return aoe.TargetInfo{}, fmt.Errorf("discover %s: %w", addr, err)
	}
	for _, ti := range infos {
		if ti.Shelf == addr.Shelf && ti.Slot == addr.Slot && (mac == aoe.MAC{} || ti.MAC == mac) {
			return ti, nil
		}
	}
	return aoe.TargetInfo{}, fmt.Errorf("target %s did not answer discovery within %v (is it exported on this LAN? check with vbladectl discover)", addr, wait)
}

// progressWriter returns where the live progress line goes: stderr when it
// is a terminal, nowhere otherwise (logs get the summary only).
func progressWriter() io.Writer {
	if term.IsTerminal(int(os.Stderr.Fd())) {
		return os.Stderr
	}
	return nil
}

// benchState is shared by the workers; counters are atomic and everything
// else is per worker or written once.
type benchState struct {
	cfg   benchConfig
	start time.Time

	ops, reads, writes, bytes, errs, verified, unverified, mismatches atomic.Int64
	seq                                                               atomic.Uint64

	// Completion gaps, in nanoseconds since start.
	last     atomic.Int64
	maxGap   atomic.Int64
	gapMu    sync.Mutex
	gapStart int64

	msgMu      sync.Mutex
	firstErrs  []string
	firstMisms []string

	// Verification: the generation last acknowledged for each block and
	// the one written but not acknowledged (0: none). Block b belongs to
	// worker b % window alone, so no locking is needed.
	acked, pending []uint32
}

func (st *benchState) note(list *[]string, s string) {
	st.msgMu.Lock()
	if len(*list) < 5 {
		*list = append(*list, s)
	}
	st.msgMu.Unlock()
}

func (st *benchState) completed() {
	now := int64(time.Since(st.start))
	prev := st.last.Swap(now)
	gap := now - prev
	if gap > st.maxGap.Load() {
		st.gapMu.Lock()
		if gap > st.maxGap.Load() {
			st.maxGap.Store(gap)
			st.gapStart = prev
		}
		st.gapMu.Unlock()
	}
}

func runBench(parent context.Context, client *aoe.Client, cfg benchConfig, progress io.Writer) benchResult {
	ctx, cancel := context.WithTimeout(parent, cfg.duration)
	defer cancel()
	st := &benchState{cfg: cfg, start: time.Now()}
	if cfg.verify {
		st.acked = make([]uint32, cfg.blocks)
		st.pending = make([]uint32, cfg.blocks)
	}
	hists := make([]*histogram, cfg.window)
	var wg sync.WaitGroup
	for w := 0; w < cfg.window; w++ {
		hists[w] = new(histogram)
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			st.worker(ctx, cancel, client, w, hists[w])
		}(w)
	}
	done := make(chan struct{})
	if progress != nil {
		go func() {
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			var lastOps int64
			for {
				select {
				case <-done:
					fmt.Fprint(progress, "\r\033[K")
					return
				case <-tick.C:
					ops := st.ops.Load()
					s := client.Stats()
					fmt.Fprintf(progress, "\r\033[K%5.0fs  %8d IOPS  %7.1f MB/s  errors %d  retransmits %d  mismatches %d",
						time.Since(st.start).Seconds(), ops-lastOps,
						float64(ops-lastOps)*float64(cfg.bs*aoe.SectorSize)/1e6,
						st.errs.Load(), s.Retransmits, st.mismatches.Load())
					lastOps = ops
				}
			}
		}()
	}
	wg.Wait()
	close(done)
	elapsed := time.Since(st.start)

	var h histogram
	for _, x := range hists {
		h.merge(x)
	}
	r := benchResult{
		Mode: cfg.mode, Window: cfg.window, BlockSectors: cfg.bs, Seconds: elapsed.Seconds(),
		Ops: st.ops.Load(), Reads: st.reads.Load(), Writes: st.writes.Load(), Bytes: st.bytes.Load(),
		Errors: st.errs.Load(), Verified: st.verified.Load(), Unverified: st.unverified.Load(),
		Mismatches: st.mismatches.Load(), FirstErrors: st.firstErrs, FirstMismatches: st.firstMisms,
		LatP50us: h.quantile(0.50) / 1e3, LatP99us: h.quantile(0.99) / 1e3, LatMaxus: float64(h.max) / 1e3,
	}
	r.IOPS = float64(r.Ops) / elapsed.Seconds()
	r.MBps = float64(r.Bytes) / elapsed.Seconds() / 1e6
	if gap := st.maxGap.Load(); gap > 0 {
		r.StallMs = float64(gap) / 1e6
		r.StallStart = st.start.Add(time.Duration(st.gapStart)).Format(time.RFC3339Nano)
		r.StallEnd = st.start.Add(time.Duration(st.gapStart + gap)).Format(time.RFC3339Nano)
	}
	return r
}

func (st *benchState) worker(ctx context.Context, stopAll context.CancelFunc, client *aoe.Client, w int, h *histogram) {
	cfg := st.cfg
	n := cfg.window
	bsBytes := cfg.bs * aoe.SectorSize
	buf := make([]byte, bsBytes)
	rng := rand.New(rand.NewPCG(uint64(w)+1, uint64(time.Now().UnixNano())))
	// The blocks this worker owns are w, w+n, w+2n, ...
	owned := (cfg.blocks - uint64(w) + uint64(n) - 1) / uint64(n)
	var cursor uint64
	var gen uint32
	for ctx.Err() == nil {
		if cfg.count > 0 && st.ops.Load() >= cfg.count {
			stopAll()
			return
		}
		var block uint64
		write := false
		switch cfg.mode {
		case "randread", "randwrite", "mixed":
			block = uint64(w) + uint64(n)*rng.Uint64N(owned)
			write = cfg.mode == "randwrite" || (cfg.mode == "mixed" && rng.IntN(100) >= cfg.rwmix)
		default:
			if cfg.verify {
				block = uint64(w) + uint64(n)*(cursor%owned)
				cursor++
			} else {
				block = (st.seq.Add(1) - 1) % cfg.blocks
			}
			write = cfg.mode == "seqwrite"
		}
		lba := block * uint64(cfg.bs)
		if write && cfg.verify {
			gen++
			if gen == 0 {
				gen = 1
			}
			fillPattern(buf, lba, gen)
			st.pending[block] = gen
		}
		t0 := time.Now()
		var err error
		if write {
			err = client.WriteAt(ctx, cfg.remote, buf, lba)
		} else {
			err = client.ReadAt(ctx, cfg.remote, buf, lba)
		}
		lat := time.Since(t0)
		if err != nil {
			if ctx.Err() != nil {
				return // the run ended with this command in flight
			}
			st.errs.Add(1)
			st.note(&st.firstErrs, err.Error())
			continue
		}
		st.completed()
		h.record(int64(lat))
		st.ops.Add(1)
		st.bytes.Add(int64(bsBytes))
		if write {
			st.writes.Add(1)
			if cfg.verify {
				st.acked[block], st.pending[block] = gen, 0
			}
			continue
		}
		st.reads.Add(1)
		if cfg.verify {
			st.check(buf, block, lba)
		}
	}
}

// check compares a read with the last acknowledged write of its block. A
// write that failed (no acknowledgement) may or may not have landed, so its
// generation is accepted too, and then becomes the known state.
func (st *benchState) check(buf []byte, block, lba uint64) {
	acked, pending := st.acked[block], st.pending[block]
	if acked == 0 && pending == 0 {
		st.unverified.Add(1)
		return
	}
	if acked != 0 && matchPattern(buf, lba, acked) {
		st.verified.Add(1)
		return
	}
	if pending != 0 && matchPattern(buf, lba, pending) {
		st.acked[block], st.pending[block] = pending, 0
		st.verified.Add(1)
		return
	}
	if acked == 0 {
		// Never acknowledged, the failed write did not land: old content.
		st.unverified.Add(1)
		return
	}
	st.mismatches.Add(1)
	gotLBA, gotGen := binary.LittleEndian.Uint64(buf[8:16]), binary.LittleEndian.Uint64(buf[16:24])
	st.note(&st.firstMisms, fmt.Sprintf("lba %d: want generation %d (or pending %d), found header lba %d generation %d",
		lba, acked, pending, gotLBA, gotGen))
}

const patternMagic = 0x41_48_45_44_41_4c_42_56 // "VBLADEHA" when stored little-endian

// fillPattern makes every sector of buf self-describing: magic, its own
// lba, the generation, then a stream derived from both, so a read of stale,
// misplaced or torn data is told apart from the expected content.
func fillPattern(buf []byte, lba uint64, gen uint32) {
	for s := 0; s < len(buf)/aoe.SectorSize; s++ {
		p := buf[s*aoe.SectorSize : (s+1)*aoe.SectorSize]
		l := lba + uint64(s)
		binary.LittleEndian.PutUint64(p[0:], patternMagic)
		binary.LittleEndian.PutUint64(p[8:], l)
		binary.LittleEndian.PutUint64(p[16:], uint64(gen))
		x := l*0x9e3779b97f4a7c15 ^ uint64(gen)<<32 ^ 0x2545f4914f6cdd1d
		for i := 24; i < aoe.SectorSize; i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(p[i:], x)
		}
	}
}

func matchPattern(buf []byte, lba uint64, gen uint32) bool {
	var want [aoe.SectorSize]byte
	for s := 0; s < len(buf)/aoe.SectorSize; s++ {
		fillPattern(want[:], lba+uint64(s), gen)
		if string(want[:]) != string(buf[s*aoe.SectorSize:(s+1)*aoe.SectorSize]) {
			return false
		}
	}
	return true
}

func printBench(w io.Writer, r benchResult) {
	fmt.Fprintf(w, "target %s at %s  mode %s  window %d  bs %d sectors  span %d bytes\n",
		r.Target, r.MAC, r.Mode, r.Window, r.BlockSectors, r.SpanBytes)
	fmt.Fprintf(w, "ops %d (reads %d, writes %d) in %.2fs: %.0f IOPS, %.1f MB/s\n",
		r.Ops, r.Reads, r.Writes, r.Seconds, r.IOPS, r.MBps)
	fmt.Fprintf(w, "latency p50 %.0fus  p99 %.0fus  max %.0fus\n", r.LatP50us, r.LatP99us, r.LatMaxus)
	fmt.Fprintf(w, "retransmits %d (late answers %d)  timeouts %d  errors %d\n", r.Retransmits, r.Late, r.Timeouts, r.Errors)
	if r.StallMs > 0 {
		fmt.Fprintf(w, "longest stall %.1fms (from %s to %s)\n", r.StallMs, r.StallStart, r.StallEnd)
	}
	if r.Verified+r.Unverified+r.Mismatches > 0 {
		fmt.Fprintf(w, "verify: %d reads checked, %d of never-written blocks, %d mismatches\n",
			r.Verified, r.Unverified, r.Mismatches)
	}
	for _, e := range r.FirstErrors {
		fmt.Fprintln(w, "error:", e)
	}
	for _, m := range r.FirstMismatches {
		fmt.Fprintln(w, "mismatch:", m)
	}
}

// histogram is a log-linear latency histogram: 16 buckets per power of
// two (about 6% resolution), fixed size, no allocation while recording.
type histogram struct {
	counts [1024]uint64
	n      uint64
	max    int64
}

func histBucket(v int64) int {
	if v < 16 {
		return int(max(v, 0))
	}
	e := bits.Len64(uint64(v)) - 5
	return (e+1)*16 + int(uint64(v)>>e) - 16
}

func histValue(i int) float64 {
	if i < 16 {
		return float64(i)
	}
	e := i/16 - 1
	m := uint64(i%16 + 16)
	return float64(m<<e) + float64(uint64(1)<<e)/2
}

func (h *histogram) record(v int64) {
	h.counts[histBucket(v)]++
	h.n++
	if v > h.max {
		h.max = v
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

func (h *histogram) quantile(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n-1)) + 1
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(histValue(i), float64(h.max))
		}
	}
	return float64(h.max)
}
