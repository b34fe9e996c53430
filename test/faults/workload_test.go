package faults

// Workload of the fault suite: several concurrent clients reading and writing
// a small set of blocks through in-process AoE initiators, recording every
// operation with its invocation and completion time and its outcome. Writes
// carry unique values, so a read names the write it observed.

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
)

const (
	blockSz = 1024 // one AoE frame at MTU 1500: a block is written atomically
	// Probe blocks (disk-full fault) start here, one per 4 KiB page, so each
	// probe needs a page of its own on the filesystem.
	probeBase = 1 << 20
	probeStep = 4096
	maxProbes = (imgSize - probeBase) / probeStep
)

type outcome uint8

const (
	okOutcome outcome = iota
	failOutcome
	unknownOutcome
)

func (o outcome) String() string {
	return [...]string{"ok", "fail", "unknown"}[o]
}

// op is one recorded operation. Times are nanoseconds since the run's start.
type op struct {
	Client  int     `json:"client"`
	Block   int     `json:"block"` // block index (probes: probeBlock(k))
	Write   bool    `json:"write"`
	Value   uint64  `json:"value"` // written, or read (garbageValue: not a value any write carries)
	Call    int64   `json:"call"`
	Return  int64   `json:"return"`
	Outcome outcome `json:"outcome"`
	Err     string  `json:"err,omitempty"`
}

// garbageValue marks a read whose content matched no write and not the
// initial zeros.
const garbageValue = ^uint64(0)

// probeBlock is the history's block number of probe k (kept apart from the
// workload's blocks).
func probeBlock(k int) int { return 1_000_000 + k }

func blockOffset(block int) int64 {
	if block >= 1_000_000 {
		return probeBase + int64(block-1_000_000)*probeStep
	}
	return int64(block) * blockSz
}

var magic = []byte("vbfaults")

// encode fills b with the content of value v written to block.
func encode(b []byte, block int, v uint64) {
	copy(b[0:8], magic)
	binary.LittleEndian.PutUint64(b[8:], uint64(block))
	binary.LittleEndian.PutUint64(b[16:], v)
	r := rand.New(rand.NewPCG(uint64(block), v))
	for i := 24; i+8 <= len(b)-4; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.ChecksumIEEE(b[:len(b)-4]))
}

// decode returns the value a block's content carries: 0 for all zeros (the
// initial content), garbageValue when it is neither.
func decode(b []byte, block int) uint64 {
	zero := true
	for _, x := range b {
		if x != 0 {
			zero = false
			break
		}
	}
	if zero {
		return 0
	}
	if string(b[0:8]) != string(magic) || binary.LittleEndian.Uint64(b[8:]) != uint64(block) ||
		binary.LittleEndian.Uint32(b[len(b)-4:]) != crc32.ChecksumIEEE(b[:len(b)-4]) {
		return garbageValue
	}
	return binary.LittleEndian.Uint64(b[16:])
}

// recorder collects the history.
type recorder struct {
	start time.Time
	mu    sync.Mutex
	ops   []op
	vals  atomic.Uint64
}

func (r *recorder) now() int64 { return int64(time.Since(r.start)) }

func (r *recorder) add(o op) {
	r.mu.Lock()
	r.ops = append(r.ops, o)
	r.mu.Unlock()
}

func (r *recorder) snapshot() []op {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]op(nil), r.ops...)
}

// nextValue is a fresh value, unique across the run.
func (r *recorder) nextValue() uint64 { return r.vals.Add(1) }

type initiator struct {
	cl  *aoe.Client
	rem aoe.Remote
}

// do runs one read or write of block and records it.
func (r *recorder) do(ctx context.Context, in initiator, client, block int, write bool, timeout time.Duration) op {
	buf := make([]byte, blockSz)
	o := op{Client: client, Block: block, Write: write}
	if write {
		o.Value = r.nextValue()
		encode(buf, block, o.Value)
	}
	octx, cancel := context.WithTimeout(ctx, timeout)
	o.Call = r.now()
	var err error
	lba := uint64(blockOffset(block) / 512)
	if write {
		err = in.cl.WriteAt(octx, in.rem, buf, lba)
	} else {
		err = in.cl.ReadAt(octx, in.rem, buf, lba)
	}
	o.Return = r.now()
	cancel()
	switch {
	case err == nil:
		o.Outcome = okOutcome
		if !write {
			o.Value = decode(buf, block)
		}
	case write:
		// A write that timed out or was refused may still commit (an
		// entry appended before leadership was lost commits later), so
		// its effect is unknown, whatever the error.
		o.Outcome = unknownOutcome
		o.Err = err.Error()
	default:
		o.Outcome = failOutcome
		o.Err = err.Error()
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil && !write {
		return o // the run is stopping: an interrupted read says nothing
	}
	r.add(o)
	return o
}

// workload runs `workers` clients, spread over the initiators, until ctx ends
// or maxOps operations were done.
type workload struct {
	rec     *recorder
	inits   []initiator
	blocks  int
	workers int
	timeout time.Duration
	maxOps  int64
	ops     atomic.Int64
	wg      sync.WaitGroup
	cancel  context.CancelFunc
}

func (w *workload) start(limit time.Duration, seed uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	w.cancel = cancel
	for k := 0; k < w.workers; k++ {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(k)))
			in := w.inits[k%len(w.inits)]
			for ctx.Err() == nil && w.ops.Add(1) <= w.maxOps {
				w.rec.do(ctx, in, k, rng.IntN(w.blocks), rng.IntN(2) == 0, w.timeout)
			}
		}()
	}
}

func (w *workload) stop() {
	w.cancel()
	w.wg.Wait()
}
