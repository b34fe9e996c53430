package node

import (
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/replication"
)

// BenchmarkLogRound measures the disk work every replicated write round must
// wait for, and nothing else: the leader's Raft log commit of one Batch entry
// holding 16 one-frame writes (at LOGROUND_MTU, default 1500), then the two followers' commits of
// the same entry at once, until the first of them is done (a quorum). That is
// the order hashicorp/raft imposes (the leader stores before it replicates),
// and each bolt commit is two fdatasyncs. No network, no apply, no AoE: the
// ceiling metric, 16 writes per round, bounds what any implementation on
// this log can reach at window 16 on the disk under LOGROUND_DIR (default:
// the test's temporary directory). ops/bench/cluster.sh runs it beside
// Debian's vblade -s.
func BenchmarkLogRound(b *testing.B) {
	const window = 16
	dir := os.Getenv("LOGROUND_DIR")
	if dir == "" {
		dir = b.TempDir()
	} else {
		var err error
		if dir, err = os.MkdirTemp(dir, "loground-"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
	}
	stores := make([]*raftboltdb.BoltStore, 3)
	for i := range stores {
		s, err := openRaftLog(filepath.Join(dir, "raft"+string(rune('0'+i))+".db"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		stores[i] = s
	}
	// One frame's worth of sectors per write, as the bench sends; the
	// round goes in Batch entries of at most replication.DefaultMaxBatch
	// bytes, as the leader's group commit proposes it.
	mtu := 1500
	if v := os.Getenv("LOGROUND_MTU"); v != "" {
		var err error
		if mtu, err = strconv.Atoi(v); err != nil {
			b.Fatalf("LOGROUND_MTU=%q: %v", v, err)
		}
	}
	var entries [][]byte
	batch := replication.Entry{Op: replication.OpBatch}
	size := 0
	flush := func() {
		data, err := batch.MarshalBinary()
		if err != nil {
			b.Fatal(err)
		}
		entries = append(entries, data)
		batch.Batch, size = nil, 0
	}
	for i := range window {
		w := replication.Entry{
			Op: replication.OpWrite, Target: replication.TargetID{Shelf: 1}, Offset: int64(i) << 20,
			Data: make([]byte, aoe.SectorsPerFrame(mtu)*aoe.SectorSize), Request: aoe.RequestID{Src: aoe.MAC{2, 0, 0, 0, 0, 1}, Tag: uint32(i)},
		}
		if size > 0 && size+len(w.Data) > replication.DefaultMaxBatch {
			flush()
		}
		batch.Batch = append(batch.Batch, w)
		size += len(w.Data)
	}
	flush()
	var quorum time.Duration
	next := uint64(1)
	b.ResetTimer()
	for range b.N {
		logs := make([]*raft.Log, len(entries))
		for j, data := range entries {
			logs[j] = &raft.Log{Index: next, Term: 1, Type: raft.LogCommand, Data: data}
			next++
		}
		start := time.Now()
		if err := stores[0].StoreLogs(logs); err != nil {
			b.Fatal(err)
		}
		first := make(chan error, 2)
		var wg sync.WaitGroup
		for _, f := range stores[1:] {
			wg.Go(func() { first <- f.StoreLogs(logs) })
		}
		if err := <-first; err != nil {
			b.Fatal(err)
		}
		quorum += time.Since(start)
		// The next round starts once both followers are done, as the
		// slower one's commit would otherwise overlap it.
		wg.Wait()
		if err := <-first; err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	perRound := quorum.Seconds() / float64(b.N)
	b.ReportMetric(perRound*1e3, "ms/quorum")
	b.ReportMetric(window/perRound, "ceiling-IOPS")
}
