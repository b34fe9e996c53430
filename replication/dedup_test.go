package replication

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

var (
	macA = aoe.MAC{0x02, 0, 0, 0, 0, 0xa}
	macB = aoe.MAC{0x02, 0, 0, 0, 0, 0xb}
)

func idWrite(id TargetID, src aoe.MAC, tag uint32, off int64, data []byte) Entry {
	return Entry{Op: OpWrite, Target: id, Offset: off, Data: data, Request: aoe.RequestID{Src: src, Tag: tag}}
}

func wantNil(t testing.TB, resps []any) {
	t.Helper()
	for i, r := range resps {
		if r != nil {
			t.Fatalf("response %d: %v", i, r)
		}
	}
}

// recentTables returns each target's recent-write table, oldest first.
func recentTables(f *FSM) map[TargetID][]recentWrite {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := map[TargetID][]recentWrite{}
	for id, r := range f.recent {
		if len(r.ring) > 0 {
			out[id] = r.list()
		}
	}
	return out
}

func sameTables(a, b map[TargetID][]recentWrite) bool {
	if len(a) != len(b) {
		return false
	}
	for id, l := range a {
		if !slices.Equal(l, b[id]) {
			return false
		}
	}
	return true
}

// The bug the fault suite found: W1 applied, W2 to the same block applied and
// acknowledged, then the retransmitted copy of W1 (same source and tag) is
// committed. Applying it would bring W1 back; it must be skipped.
func TestFSMSkipsRetransmittedWrite(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 8192})
	w1 := idWrite(tA, macA, 0x10005, 1024, pattern(1, 1024))
	w2 := idWrite(tA, macB, 0x20007, 1024, pattern(2, 512))
	wantNil(t, fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 8192}, w1, w2, w1))
	want := make([]byte, 8192)
	copy(want[1024:], pattern(1, 1024))
	copy(want[1024:], pattern(2, 512))
	if !bytes.Equal(fx.disks[tA].bytes(), want) {
		t.Fatal("the retransmitted copy of W1 was applied over W2")
	}
	if got := fx.fsm.DuplicateWrites(); got != 1 {
		t.Fatalf("DuplicateWrites %d, want 1", got)
	}
	// A copy right behind its original is skipped too (and changes nothing).
	w3 := idWrite(tA, macA, 0x10006, 0, pattern(3, 512))
	wantNil(t, fx.apply(t, w3, w3, w3))
	if got := fx.fsm.DuplicateWrites(); got != 3 {
		t.Fatalf("DuplicateWrites %d, want 3", got)
	}
	if got := fx.fsm.AppliedIndex(); got != 7 {
		t.Fatalf("applied %d, want 7: a skipped entry still advances the index", got)
	}
}

func TestFSMDedupKeysOnContent(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 8192, tB: 8192})
	wantNil(t, fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 8192}, Entry{Op: OpAddTarget, Target: tB, Size: 8192}))
	orig := idWrite(tA, macA, 9, 0, pattern(1, 512))
	other := Entry{Op: OpWrite, Target: tA, Offset: 0, Data: pattern(2, 512)} // no identity
	for name, c := range map[string]Entry{
		// Same identity, different write: a reused tag, applied.
		"other offset":  idWrite(tA, macA, 9, 512, pattern(1, 512)),
		"other data":    idWrite(tA, macA, 9, 0, pattern(4, 512)),
		"other length":  idWrite(tA, macA, 9, 0, pattern(1, 1024)),
		"other source":  idWrite(tA, macB, 9, 0, pattern(1, 512)),
		"other tag":     idWrite(tA, macA, 10, 0, pattern(1, 512)),
		"other target":  idWrite(tB, macA, 9, 0, pattern(1, 512)),
		"no identity":   {Op: OpWrite, Target: tA, Offset: 0, Data: pattern(1, 512)},
		"zero src, tag": idWrite(tA, aoe.MAC{}, 0, 0, pattern(1, 512)),
	} {
		t.Run(name, func(t *testing.T) {
			wantNil(t, fx.apply(t, orig, other))
			before := fx.fsm.DuplicateWrites()
			wantNil(t, fx.apply(t, c))
			if fx.fsm.DuplicateWrites() != before {
				t.Fatalf("%+v was taken for a retransmission of %+v", c.Request, orig.Request)
			}
			got := make([]byte, len(c.Data))
			fx.disks[c.Target].ReadAt(context.Background(), got, c.Offset)
			if !bytes.Equal(got, c.Data) {
				t.Fatal("the write was not applied")
			}
		})
	}

	// Entries without identity are never deduplicated, whatever their tag.
	anon := idWrite(tA, aoe.MAC{}, 77, 0, pattern(5, 512))
	wantNil(t, fx.apply(t, anon, other, anon))
	if !bytes.Equal(fx.disks[tA].bytes()[:512], pattern(5, 512)) {
		t.Fatal("a write with a zero source was deduplicated")
	}
	if tables := recentTables(fx.fsm); slices.ContainsFunc(tables[tA], func(w recentWrite) bool { return w.ID.Src == (aoe.MAC{}) }) {
		t.Fatal("a write with a zero source was recorded")
	}

	// A reused identity replaces what it is compared with: the older
	// write's copy is applied, the newer one's is skipped.
	a, b := idWrite(tA, macB, 5, 0, pattern(6, 512)), idWrite(tA, macB, 5, 0, pattern(7, 512))
	wantNil(t, fx.apply(t, a, b, a))
	if !bytes.Equal(fx.disks[tA].bytes()[:512], pattern(6, 512)) {
		t.Fatal("a copy of a write whose identity was reused since was skipped")
	}
	before := fx.fsm.DuplicateWrites()
	wantNil(t, fx.apply(t, other, a))
	if fx.fsm.DuplicateWrites() != before+1 || !bytes.Equal(fx.disks[tA].bytes()[:512], pattern(2, 512)) {
		t.Fatal("the copy of the newest write of an identity was applied")
	}

	// Rejected writes are not recorded: the same write after the target
	// exists is applied.
	fx2 := newFSMFixture(t, map[TargetID]int64{tA: 4096})
	w := idWrite(tA, macA, 1, 0, pattern(8, 512))
	resps := fx2.apply(t, w, Entry{Op: OpAddTarget, Target: tA, Size: 4096}, w)
	if asErr(resps[0]) == nil || resps[2] != nil || fx2.fsm.DuplicateWrites() != 0 {
		t.Fatalf("responses %v, duplicates %d", resps, fx2.fsm.DuplicateWrites())
	}
}

func TestFSMDedupWindowEvictsOldest(t *testing.T) {
	for _, tc := range []struct {
		between int
		skipped bool
	}{
		{DedupWindow - 1, true}, // still remembered
		{DedupWindow, false},    // evicted: the copy is applied again
	} {
		t.Run(fmt.Sprint(tc.between), func(t *testing.T) {
			fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20, tB: 4096})
			wantNil(t, fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20}, Entry{Op: OpAddTarget, Target: tB, Size: 4096}))
			w1 := idWrite(tA, macA, 0, 0, pattern(1, 512))
			wantNil(t, fx.apply(t, w1))
			batch := []Entry{}
			for i := range tc.between {
				batch = append(batch, idWrite(tA, macB, uint32(i), 4096, pattern(2, 512)))
				// Writes to another target and writes without identity
				// take no room in tA's table.
				batch = append(batch, idWrite(tB, macA, uint32(i), 0, pattern(3, 512)),
					Entry{Op: OpWrite, Target: tA, Offset: 8192, Data: pattern(4, 512)})
				if len(batch) >= 3000 {
					wantNil(t, fx.apply(t, batch...))
					batch = batch[:0]
				}
			}
			wantNil(t, fx.apply(t, batch...))
			wantNil(t, fx.apply(t, Entry{Op: OpWrite, Target: tA, Data: pattern(5, 512)}, w1))
			if got := fx.fsm.DuplicateWrites(); (got == 1) != tc.skipped {
				t.Fatalf("after %d identified writes the copy was skipped=%v, want %v", tc.between, got == 1, tc.skipped)
			}
			if n := len(recentTables(fx.fsm)[tA]); n != min(tc.between+1+boolInt(!tc.skipped), DedupWindow) {
				t.Fatalf("table holds %d writes", n)
			}
		})
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestFSMRemoveTargetForgetsItsWrites(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
	w := idWrite(tA, macA, 1, 0, pattern(1, 512))
	wantNil(t, fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 4096}, w,
		Entry{Op: OpRemoveTarget, Target: tA, Size: 4096}, Entry{Op: OpAddTarget, Target: tA, Size: 4096}, w))
	if fx.fsm.DuplicateWrites() != 0 {
		t.Fatal("a re-added target remembered the writes of its previous life")
	}
}

// dedupScenario generates writes in which retransmitted copies, reused tags
// and writes without identity interleave on a few blocks, so that skipping or
// applying any copy wrongly changes the image.
func dedupScenario(n int, seed uint64) []Entry {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	srcs := []aoe.MAC{macA, macB, {0x02, 0, 0, 0, 0, 0xc}, {}}
	counters := make([]uint32, len(srcs))
	var out []Entry
	for i := range n {
		if len(out) > 0 && rng.IntN(5) == 0 {
			// A retransmission of one of the last writes.
			out = append(out, out[len(out)-1-rng.IntN(min(len(out), 64))])
			continue
		}
		s := rng.IntN(len(srcs))
		counters[s]++
		target := tA
		if rng.IntN(4) == 0 {
			target = tB
		}
		out = append(out, idWrite(target, srcs[s], counters[s]%3000, int64(rng.IntN(16))*512,
			pattern(i%97, 512*(1+rng.IntN(2)))))
	}
	return out
}

// A node restored from a snapshot (its image possibly newer than the
// snapshot, as after a crash or an install) and replaying the log after it
// must take every skip-or-apply decision a node that never restarted takes:
// same final image, same table.
func TestFSMRestoreThenReplayMatchesNeverSnapshotted(t *testing.T) {
	sizes := map[TargetID]int64{tA: 16 << 10, tB: 16 << 10}
	setup := []Entry{{Op: OpAddTarget, Target: tA, Size: sizes[tA]}, {Op: OpAddTarget, Target: tB, Size: sizes[tB]}}
	entries := append(slices.Clone(setup), dedupScenario(30000, 1)...)

	applyAll := func(fx *fsmFixture, es []Entry) {
		for len(es) > 0 {
			n := min(len(es), 512)
			wantNil(t, fx.apply(t, es[:n]...))
			es = es[n:]
		}
	}
	ref := newFSMFixture(t, sizes)
	applyAll(ref, entries)
	if ref.fsm.DuplicateWrites() < 1000 {
		t.Fatalf("scenario has only %d duplicates", ref.fsm.DuplicateWrites())
	}
	// Sanity: the skips matter (applying every copy gives another image).
	naive := newFSMFixture(t, sizes)
	for _, e := range entries {
		e.Request = aoe.RequestID{}
		wantNil(t, naive.apply(t, e))
	}
	if bytes.Equal(naive.disks[tA].bytes(), ref.disks[tA].bytes()) {
		t.Fatal("scenario too weak: applying every copy gives the same image")
	}

	for _, k := range []int{2, 500, 9000, 20000, len(entries)} {
		for _, ahead := range []int{0, 700} {
			t.Run(fmt.Sprintf("snapshot at %d, image %d ahead", k, ahead), func(t *testing.T) {
				a := newFSMFixture(t, sizes)
				applyAll(a, entries[:k])
				snap, err := a.fsm.Snapshot()
				if err != nil {
					t.Fatal(err)
				}
				j := min(k+ahead, len(entries))
				applyAll(a, entries[k:j]) // the image moves on past the snapshot
				inner := raft.NewInmemSnapshotStore()
				store := NewSnapshotStore(inner, a.fsm, SnapshotStoreOptions{})
				sink, err := store.Create(raft.SnapshotVersionMax, uint64(k), 1, raft.Configuration{}, 1, nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := snap.Persist(sink); err != nil {
					t.Fatal(err)
				}

				// Restart: same images (now at j), fresh FSM, restore, replay.
				b := &fsmFixture{disks: map[TargetID]*memDisk{}, sink: newRecordingSink(), next: uint64(k) + 1}
				disks := map[TargetID]aoe.Disk{}
				for id, d := range a.disks {
					nd := newMemDisk(d.Size())
					copy(nd.live, d.bytes())
					b.disks[id], disks[id] = nd, nd
				}
				b.fsm = NewFSM(FSMOptions{Disks: disks, Sink: b.sink})
				_, rc, err := store.Open(sink.ID())
				if err != nil {
					t.Fatal(err)
				}
				if err := b.fsm.Restore(rc); err != nil {
					t.Fatal(err)
				}
				rc.Close()
				if b.fsm.AppliedIndex() != uint64(k) {
					t.Fatalf("restored at %d, want %d", b.fsm.AppliedIndex(), k)
				}
				applyAll(b, entries[k:])
				for id := range sizes {
					if !bytes.Equal(b.disks[id].bytes(), ref.disks[id].bytes()) {
						t.Fatalf("%v after restore and replay differs from the node that never restarted", id)
					}
				}
				if !sameTables(recentTables(b.fsm), recentTables(ref.fsm)) {
					t.Fatal("recent-write tables differ after restore and replay")
				}
			})
		}
	}
}

func TestSnapshotKeepsRecentWrites(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20, tB: 4096})
	wantNil(t, fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20}, Entry{Op: OpAddTarget, Target: tB, Size: 4096}))
	var es []Entry
	for i := range DedupWindow + 100 { // wrap the ring, with stale slots
		es = append(es, idWrite(tA, macA, uint32(i%5000), int64(i%2000)*512, pattern(i, 512)))
	}
	es = append(es, idWrite(tB, macB, 3, 0, pattern(1, 1024)))
	wantNil(t, fx.apply(t, es...))
	want := recentTables(fx.fsm)
	if len(want[tA]) != DedupWindow || len(want[tB]) != 1 {
		t.Fatalf("table sizes %d and %d", len(want[tA]), len(want[tB]))
	}

	inner := raft.NewInmemSnapshotStore()
	store := NewSnapshotStore(inner, fx.fsm, SnapshotStoreOptions{})
	id := persist(t, fx, store)
	metas, _ := inner.List()
	if max := int64(2*(DedupWindow+10)*recentWriteLen + 1024); metas[0].Size > max {
		t.Errorf("metadata of %d bytes, want at most %d", metas[0].Size, max)
	}
	fx2 := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20, tB: 4096})
	_, rc, err := NewSnapshotStore(inner, fx2.fsm, SnapshotStoreOptions{}).Open(id)
	if err != nil {
		t.Fatal(err)
	}
	if err := fx2.fsm.Restore(rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if !sameTables(recentTables(fx2.fsm), want) {
		t.Fatal("restore did not bring back the recent-write tables")
	}
	// The restored node recognises a copy of the last write.
	fx2.next = fx.next
	wantNil(t, fx2.apply(t, es[len(es)-1]))
	if fx2.fsm.DuplicateWrites() != 1 {
		t.Fatal("restored FSM applied a retransmission again")
	}

	// Restoring an older snapshot replaces the tables, it does not merge.
	fx3 := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20, tB: 4096})
	wantNil(t, fx3.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20}))
	id3 := persist(t, fx3, NewSnapshotStore(inner, fx3.fsm, SnapshotStoreOptions{}))
	_, rc, _ = NewSnapshotStore(inner, fx2.fsm, SnapshotStoreOptions{}).Open(id3)
	if err := fx2.fsm.Restore(rc); err != nil {
		t.Fatal(err)
	}
	if len(recentTables(fx2.fsm)) != 0 {
		t.Fatal("tables survived the restore of a snapshot without them")
	}
}

// A snapshot written before recent-write tables existed (metadata version 1)
// restores with empty tables: its node applied only version 1 entries, which
// carry no identity.
func TestRestoreLegacySnapshot(t *testing.T) {
	meta := snapshotMeta{Index: 3, version: metaVersionLegacy, Targets: []TargetInfo{{ID: tA, Size: 4096}}}
	b := meta.encode(false)
	if b[4] != 1 {
		t.Fatalf("legacy encoding has version %d", b[4])
	}
	fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
	if err := fx.fsm.Restore(nopCloser{bytes.NewReader(b)}); err != nil {
		t.Fatal(err)
	}
	if fx.fsm.AppliedIndex() != 3 || len(fx.fsm.Targets()) != 1 {
		t.Fatalf("restored %d targets at %d", len(fx.fsm.Targets()), fx.fsm.AppliedIndex())
	}
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func TestReadMetaRejectsBadRecentWrites(t *testing.T) {
	good := snapshotMeta{Index: 1, Targets: []TargetInfo{{ID: tA, Size: 4096}},
		Recent: map[TargetID][]recentWrite{tA: {{ID: aoe.RequestID{Src: macA, Tag: 1}, Offset: 512, Length: 512}}}}
	if _, _, err := readMeta(bytes.NewReader(good.encode(false))); err != nil {
		t.Fatal(err)
	}
	for name, w := range map[string]recentWrite{
		"zero source":    {Offset: 0, Length: 512},
		"empty":          {ID: aoe.RequestID{Src: macA}, Length: 0},
		"partial sector": {ID: aoe.RequestID{Src: macA}, Length: 100},
		"unaligned":      {ID: aoe.RequestID{Src: macA}, Offset: 3, Length: 512},
		"beyond image":   {ID: aoe.RequestID{Src: macA}, Offset: 4096, Length: 512},
	} {
		m := good
		m.Recent = map[TargetID][]recentWrite{tA: {w}}
		if _, _, err := readMeta(bytes.NewReader(m.encode(false))); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
	m := good
	m.Targets = []TargetInfo{{ID: tA, Size: 4096}, {ID: tA, Size: 4096}}
	if _, _, err := readMeta(bytes.NewReader(m.encode(false))); err == nil {
		t.Error("a target listed twice decoded")
	}
	m = good
	m.Recent = map[TargetID][]recentWrite{tA: make([]recentWrite, DedupWindow+1)}
	for i := range m.Recent[tA] {
		m.Recent[tA][i] = recentWrite{ID: aoe.RequestID{Src: macA, Tag: uint32(i)}, Length: 512}
	}
	if _, _, err := readMeta(bytes.NewReader(m.encode(false))); err == nil {
		t.Error("a table larger than the window decoded")
	}
}

// The same (source, tag) write proposed twice through the cluster, with
// another write to the same block committed in between, must not bring the
// first value back: not on the leader that applied the original, not on a
// new leader after failover, not on a node that restarts and replays.
func TestClusterDeduplicatesRetransmittedWrite(t *testing.T) {
	c := newTestCluster(t, clusterOptions{})
	id := aoe.RequestID{Src: macA, Tag: 0x00030001}
	w1, w2 := pattern(11, 1024), pattern(12, 512)
	const off = 8192
	write := func(what string, f func(s *Store, ctx context.Context) error) {
		t.Helper()
		c.retry(what, func(l *testNode) error {
			s, err := l.rep.Store(tA)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return f(s, ctx)
		})
	}
	original := func(s *Store, ctx context.Context) error { return s.WriteAtOnce(ctx, w1, off, id) }
	write("original W1", original)
	write("W2 from another initiator", func(s *Store, ctx context.Context) error {
		return s.WriteAtOnce(ctx, w2, off, aoe.RequestID{Src: macB, Tag: 7})
	})
	write("retransmitted W1", original) // acknowledged, not applied

	want := make([]byte, c.opts.targets[tA])
	copy(want[off:], w1)
	copy(want[off:], w2)
	l := c.leader()
	if !bytes.Equal(readThrough(t, l, tA), want) {
		t.Fatal("the retransmitted W1 overwrote W2 on the leader")
	}
	c.waitConverged(10*time.Second, l, c.nodes...)
	for _, n := range c.nodes {
		if !bytes.Equal(n.disks[tA].bytes(), want) {
			t.Fatalf("image on %s does not end with W2", n.id)
		}
		// At least the retransmission (more if a proposal timed out and
		// c.retry sent it again, as an initiator would). A skipped entry
		// leaves the image as it was, so wait for the apply itself.
		eventually(t, 5*time.Second, "follower applies the copy", func() error {
			if n.fsm.DuplicateWrites() < 1 {
				return fmt.Errorf("%s skipped no write (applied %d)", n.id, n.fsm.AppliedIndex())
			}
			return nil
		})
	}

	// Failover: the new leader recognises the copy the old one committed.
	c.stop(l)
	write("W1 retransmitted to the new leader", original)
	nl := c.leader()
	if !bytes.Equal(readThrough(t, nl, tA), want) {
		t.Fatal("the retransmission after failover overwrote W2")
	}
	c.restart(l) // replays the whole log from scratch
	c.waitConverged(10*time.Second, nl, c.running()...)
	for _, n := range c.running() {
		if !bytes.Equal(n.disks[tA].bytes(), want) {
			t.Fatalf("image on %s does not end with W2", n.id)
		}
	}
}
