package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

var (
	tA = TargetID{1, 0}
	tB = TargetID{1, 1}
)

func cmdLog(t testing.TB, index uint64, e Entry) *raft.Log {
	t.Helper()
	b, err := e.MarshalBinary()
	if err != nil {
		t.Fatalf("marshal %+v: %v", e, err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: b}
}

type fsmFixture struct {
	fsm    *FSM
	disks  map[TargetID]*memDisk
	sink   *recordingSink
	fatals chan error
	next   uint64
}

func newFSMFixture(t testing.TB, sizes map[TargetID]int64) *fsmFixture {
	fx := &fsmFixture{disks: map[TargetID]*memDisk{}, sink: newRecordingSink(), fatals: make(chan error, 4), next: 1}
	disks := map[TargetID]aoe.Disk{}
	for id, size := range sizes {
		fx.disks[id] = newMemDisk(size)
		disks[id] = fx.disks[id]
	}
	fx.fsm = NewFSM(FSMOptions{Disks: disks, Sink: fx.sink, OnFatal: func(err error) { fx.fatals <- err }})
	return fx
}

func (fx *fsmFixture) apply(t testing.TB, entries ...Entry) []any {
	t.Helper()
	logs := make([]*raft.Log, len(entries))
	for i, e := range entries {
		logs[i] = cmdLog(t, fx.next, e)
		fx.next++
	}
	return fx.fsm.ApplyBatch(logs)
}

func TestFSMAppliesBatch(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 8192})
	st := aoe.TargetState{Config: []byte("hello"), Masks: []aoe.MAC{{1, 2, 3, 4, 5, 6}}}
	resps := fx.apply(t,
		Entry{Op: OpAddTarget, Target: tA, Size: 8192},
		Entry{Op: OpWrite, Target: tA, Offset: 512, Data: pattern(1, 1024)},
		Entry{Op: OpWrite, Target: tA, Offset: 1024, Data: pattern(2, 512)}, // overlaps: later wins
		Entry{Op: OpSetState, Target: tA, State: st},
		Entry{Op: OpNoop},
		Entry{Op: OpAddTarget, Target: tA, Size: 8192}, // idempotent
	)
	for i, r := range resps {
		if r != nil {
			t.Fatalf("entry %d: %v", i+1, r)
		}
	}
	want := make([]byte, 8192)
	copy(want[512:], pattern(1, 1024))
	copy(want[1024:], pattern(2, 512))
	if !bytes.Equal(fx.disks[tA].bytes(), want) {
		t.Fatal("image differs from the applied writes")
	}
	if got := fx.fsm.AppliedIndex(); got != 6 {
		t.Errorf("applied index %d, want 6", got)
	}
	if got, ok := fx.sink.state(tA); !ok || !got.Equal(st) {
		t.Errorf("sink state %+v, want %+v", got, st)
	}
	if info, _ := fx.fsm.Target(tA); !info.State.Equal(st) || info.Size != 8192 {
		t.Errorf("FSM target %+v", info)
	}
	// Writes were not synced: the Raft log is the durability point.
	if !bytes.Equal(fx.disks[tA].synced, make([]byte, 8192)) {
		t.Error("apply synced the image; it must not")
	}
	// Non-command logs (configuration changes) advance the index only.
	fx.fsm.ApplyBatch([]*raft.Log{{Index: 7, Type: raft.LogConfiguration}})
	if got := fx.fsm.AppliedIndex(); got != 7 {
		t.Errorf("applied index %d after a configuration log, want 7", got)
	}
}

func TestFSMRejectsDeterministically(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 4096, tB: 4096})
	resps := fx.apply(t,
		Entry{Op: OpWrite, Target: tA, Data: pattern(1, 512)}, // before AddTarget
		Entry{Op: OpAddTarget, Target: tA, Size: 4096},
		Entry{Op: OpWrite, Target: tA, Offset: 4096, Data: pattern(1, 512)}, // beyond the end
		Entry{Op: OpAddTarget, Target: tA, Size: 8192},                      // resize
		Entry{Op: OpSetState, Target: tB},                                   // unknown
		Entry{Op: OpRemoveTarget, Target: tA, Size: 512},                    // wrong size
		Entry{Op: OpWrite, Target: tA, Data: pattern(2, 512)},               // still fine
	)
	for i, want := range []bool{true, false, true, true, true, true, false} {
		var re *RejectedError
		if got := errors.As(asErr(resps[i]), &re); got != want {
			t.Errorf("entry %d: response %v, rejected=%v want %v", i+1, resps[i], got, want)
		}
	}
	if !errors.Is(asErr(resps[0]), ErrUnknownTarget) {
		t.Errorf("write before add: %v, want ErrUnknownTarget", resps[0])
	}
	if fx.fsm.Err() != nil {
		t.Fatalf("a rejection must not stop the FSM: %v", fx.fsm.Err())
	}
	if got := fx.fsm.AppliedIndex(); got != 7 {
		t.Errorf("applied %d, want 7", got)
	}
}

func asErr(v any) error {
	err, _ := v.(error)
	return err
}

func TestFSMCorruptEntryStopsBeforeHole(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 4096})
	bad := cmdLog(t, 2, Entry{Op: OpWrite, Target: tA, Data: pattern(1, 512)})
	bad.Data[10] ^= 0x40
	after := cmdLog(t, 3, Entry{Op: OpWrite, Target: tA, Offset: 512, Data: pattern(2, 512)})
	resps := fx.fsm.ApplyBatch([]*raft.Log{bad, after})

	var fe *FatalError
	if !errors.As(asErr(resps[0]), &fe) || fe.Index != 2 {
		t.Fatalf("corrupt entry: %v, want FatalError at index 2", resps[0])
	}
	if !errors.Is(fe, ErrCorruptEntry) || !strings.Contains(fe.Error(), "log entry 2") ||
		!strings.Contains(fe.Error(), "checksum") {
		t.Errorf("error %q should name the entry index and the reason", fe)
	}
	if !errors.Is(asErr(resps[1]), fe) {
		t.Errorf("entry after the hole: %v, want the same fatal error", resps[1])
	}
	if !bytes.Equal(fx.disks[tA].bytes(), make([]byte, 4096)) {
		t.Error("an entry after the corrupt one was applied over the hole")
	}
	if got := fx.fsm.AppliedIndex(); got != 1 {
		t.Errorf("applied index %d, want 1 (stopped before the hole)", got)
	}
	if _, err := fx.fsm.Snapshot(); !errors.Is(err, fe) {
		t.Errorf("snapshot after a fatal error: %v, want refusal", err)
	}
	select {
	case err := <-fx.fatals:
		if !errors.Is(err, fe) {
			t.Errorf("OnFatal got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnFatal not called")
	}
}

func TestFSMLocalFailuresAreFatal(t *testing.T) {
	t.Run("disk full", func(t *testing.T) {
		fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
		fx.disks[tA].setFail(func(op string, off int64, n int) error {
			return &fsPathError{op: op, err: syscall.ENOSPC}
		})
		resps := fx.apply(t,
			Entry{Op: OpAddTarget, Target: tA, Size: 4096},
			Entry{Op: OpWrite, Target: tA, Data: pattern(1, 512)},
		)
		var fe *FatalError
		if !errors.As(asErr(resps[1]), &fe) || !errors.Is(fe, syscall.ENOSPC) || fe.Index != 2 || fe.Target != tA {
			t.Fatalf("write on a full disk: %v, want FatalError(ENOSPC) at 2 on %v", resps[1], tA)
		}
		if !strings.Contains(fe.Error(), "restart") {
			t.Errorf("message %q does not say what to do", fe)
		}
	})
	t.Run("size mismatch", func(t *testing.T) {
		fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
		resps := fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 8192})
		var fe *FatalError
		if !errors.As(asErr(resps[0]), &fe) || !strings.Contains(fe.Error(), "exactly 8192 bytes") {
			t.Fatalf("add with a different local size: %v", resps[0])
		}
	})
	t.Run("missing image", func(t *testing.T) {
		fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
		resps := fx.apply(t, Entry{Op: OpAddTarget, Target: tB, Size: 4096})
		var fe *FatalError
		if !errors.As(asErr(resps[0]), &fe) || !strings.Contains(fe.Error(), "no local image") {
			t.Fatalf("add without a local image: %v", resps[0])
		}
	})
}

type fsPathError struct {
	op  string
	err error
}

func (e *fsPathError) Error() string { return e.op + " image: " + e.err.Error() }
func (e *fsPathError) Unwrap() error { return e.err }

// persist takes a snapshot of fx through store the way Raft does.
func persist(t testing.TB, fx *fsmFixture, store *SnapshotStore) string {
	t.Helper()
	snap, err := fx.fsm.Snapshot()
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	defer snap.Release()
	idx := fx.fsm.AppliedIndex()
	sink, err := store.Create(raft.SnapshotVersionMax, idx, 1, raft.Configuration{}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Persist(sink); err != nil {
		t.Fatalf("persist: %v", err)
	}
	return sink.ID()
}

func TestSnapshotCopiesNoImage(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 64 << 10, tB: 4096})
	st := aoe.TargetState{Config: []byte("cfg"), Reservations: []aoe.MAC{{9, 9, 9, 9, 9, 9}}}
	fx.apply(t,
		Entry{Op: OpAddTarget, Target: tA, Size: 64 << 10},
		Entry{Op: OpAddTarget, Target: tB, Size: 4096},
		Entry{Op: OpWrite, Target: tA, Offset: 4096, Data: pattern(1, 2048)},
		Entry{Op: OpSetState, Target: tB, State: st},
	)
	inner := raft.NewInmemSnapshotStore()
	store := NewSnapshotStore(inner, fx.fsm, SnapshotStoreOptions{})
	id := persist(t, fx, store)

	// Persist synced the images before recording the metadata.
	if !bytes.Equal(fx.disks[tA].synced, fx.disks[tA].live) {
		t.Error("persist did not sync the image")
	}
	metas, _ := inner.List()
	if len(metas) != 1 || metas[0].Size > 1024 {
		t.Fatalf("stored snapshot should be metadata only, got %+v", metas)
	}

	// A restart restores from the metadata without reading the image.
	fx2 := &fsmFixture{disks: fx.disks, sink: newRecordingSink()}
	fx2.fsm = NewFSM(FSMOptions{Disks: map[TargetID]aoe.Disk{tA: fx.disks[tA], tB: fx.disks[tB]}, Sink: fx2.sink})
	store2 := NewSnapshotStore(inner, fx2.fsm, SnapshotStoreOptions{})
	reads := fx.disks[tA].reads.Load() + fx.disks[tB].reads.Load()
	meta, rc, err := store2.Open(id)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(64<<10+4096+8) + int64(len(fx2.metaBytes(t, rc, meta))); meta.Size != want {
		t.Errorf("stream size %d, want %d (metadata plus images plus checksums)", meta.Size, want)
	}
	_, rc, _ = store2.Open(id)
	if err := fx2.fsm.Restore(rc); err != nil {
		t.Fatalf("restore: %v", err)
	}
	rc.Close()
	if got := fx.disks[tA].reads.Load() + fx.disks[tB].reads.Load(); got != reads {
		t.Errorf("restore read the image %d times; it must read only metadata", got-reads)
	}
	if fx2.fsm.AppliedIndex() != 4 {
		t.Errorf("restored applied index %d, want 4", fx2.fsm.AppliedIndex())
	}
	if got, _ := fx2.sink.state(tB); !got.Equal(st) {
		t.Errorf("restored state %+v, want %+v", got, st)
	}
	if fx2.fsm.streams.Load() != 0 {
		t.Error("reading only metadata must not hold compaction")
	}
}

// metaBytes reads the metadata part of a stream (and closes it).
func (fx *fsmFixture) metaBytes(t testing.TB, rc io.ReadCloser, _ *raft.SnapshotMeta) []byte {
	t.Helper()
	defer rc.Close()
	var buf bytes.Buffer
	if _, _, err := readMeta(io.TeeReader(rc, &buf)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestImageStreamInstallsOnFollower(t *testing.T) {
	sizes := map[TargetID]int64{tA: 96 << 10, tB: 8192}
	leader := newFSMFixture(t, sizes)
	leader.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 96 << 10}, Entry{Op: OpAddTarget, Target: tB, Size: 8192})
	for i := range 40 {
		leader.apply(t, Entry{Op: OpWrite, Target: tA, Offset: int64(i) * 2048, Data: pattern(i, 2048)})
	}
	leader.apply(t, Entry{Op: OpWrite, Target: tB, Offset: 512, Data: pattern(99, 4096)})
	var sent []TransferProgress
	lstore := NewSnapshotStore(raft.NewInmemSnapshotStore(), leader.fsm, SnapshotStoreOptions{
		ChunkSize: 16 << 10, Progress: func(p TransferProgress) { sent = append(sent, p) }})
	id := persist(t, leader, lstore)

	follower := newFSMFixture(t, sizes)
	for _, d := range follower.disks {
		copy(d.live, pattern(7, len(d.live))) // garbage the image must replace
	}
	var got []TransferProgress
	fstore := NewSnapshotStore(raft.NewInmemSnapshotStore(), follower.fsm, SnapshotStoreOptions{
		ChunkSize: 8 << 10, Progress: func(p TransferProgress) { got = append(got, p) }})

	meta, rc, err := lstore.Open(id)
	if err != nil {
		t.Fatal(err)
	}
	// Reading the images holds compaction on the leader until the end.
	head := make([]byte, 200)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	if _, err := leader.fsm.Snapshot(); !errors.Is(err, ErrCompactionHeld) {
		t.Errorf("snapshot during a stream: %v, want ErrCompactionHeld", err)
	}
	sink, err := fstore.Create(raft.SnapshotVersionMax, meta.Index, meta.Term, raft.Configuration{}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Write(head); err != nil {
		t.Fatal(err)
	}
	// Odd-sized copies exercise every boundary of the stream format.
	n, err := io.CopyBuffer(sink, struct{ io.Reader }{rc}, make([]byte, 777))
	if err != nil {
		t.Fatalf("stream: %v", err)
	}
	if n+200 != meta.Size {
		t.Errorf("streamed %d bytes, meta says %d", n+200, meta.Size)
	}
	rc.Close()
	if leader.fsm.streams.Load() != 0 {
		t.Error("compaction still held after the stream ended")
	}
	if err := sink.Close(); err != nil {
		t.Fatalf("close sink: %v", err)
	}
	for id, d := range follower.disks {
		if !bytes.Equal(d.bytes(), leader.disks[id].bytes()) {
			t.Errorf("%v differs after install", id)
		}
		if !bytes.Equal(d.synced, d.live) {
			t.Errorf("%v not synced before the metadata was committed", id)
		}
	}
	if follower.fsm.AppliedIndex() != meta.Index {
		t.Errorf("follower applied %d after install, want %d", follower.fsm.AppliedIndex(), meta.Index)
	}
	// An entry at or before the installed index still queued for apply is
	// covered by the image and must not roll it back.
	stale := cmdLog(t, meta.Index, Entry{Op: OpWrite, Target: tB, Offset: 512, Data: make([]byte, 512)})
	follower.fsm.ApplyBatch([]*raft.Log{stale})
	if !bytes.Equal(follower.disks[tB].bytes(), leader.disks[tB].bytes()) {
		t.Error("a stale entry was applied over the installed image")
	}
	_, frc, err := fstore.Open(sink.ID())
	if err != nil {
		t.Fatal(err)
	}
	if err := follower.fsm.Restore(frc); err != nil {
		t.Fatal(err)
	}
	frc.Close()
	if len(follower.fsm.Targets()) != 2 {
		t.Errorf("targets after restore: %+v", follower.fsm.Targets())
	}
	for name, ps := range map[string][]TransferProgress{"sent": sent, "received": got} {
		last := ps[len(ps)-1]
		if !last.Done || last.Err != nil || last.Bytes != meta.Size || last.Total != meta.Size {
			t.Errorf("%s: last progress %+v, want done with %d bytes", name, last, meta.Size)
		}
	}
}

func TestImageSinkRejectsDamage(t *testing.T) {
	sizes := map[TargetID]int64{tA: 16 << 10}
	leader := newFSMFixture(t, sizes)
	leader.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 16 << 10}, Entry{Op: OpWrite, Target: tA, Data: pattern(1, 4096)})
	lstore := NewSnapshotStore(raft.NewInmemSnapshotStore(), leader.fsm, SnapshotStoreOptions{})
	id := persist(t, leader, lstore)
	_, rc, _ := lstore.Open(id)
	stream, _ := io.ReadAll(rc)
	rc.Close()

	for name, tc := range map[string]struct {
		sizes  map[TargetID]int64
		mangle func([]byte) []byte
		want   string
	}{
		"flipped image byte": {sizes, func(b []byte) []byte { b[len(b)-100] ^= 1; return b }, "checksum mismatch"},
		"truncated":          {sizes, func(b []byte) []byte { return b[:len(b)-10] }, "ended at"},
		"extra bytes":        {sizes, func(b []byte) []byte { return append(b, 1) }, "after the end"},
		"size mismatch":      {map[TargetID]int64{tA: 8 << 10}, func(b []byte) []byte { return b }, "exactly 16384 bytes"},
		"not a snapshot":     {sizes, func(b []byte) []byte { return []byte("garbage garbage garbage") }, "bad magic"},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFSMFixture(t, tc.sizes)
			store := NewSnapshotStore(raft.NewInmemSnapshotStore(), f.fsm, SnapshotStoreOptions{})
			sink, _ := store.Create(raft.SnapshotVersionMax, 5, 1, raft.Configuration{}, 1, nil)
			_, werr := sink.Write(tc.mangle(append([]byte(nil), stream...)))
			cerr := sink.Close()
			err := errors.Join(werr, cerr)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			sink.Cancel() // Raft may cancel after a failed close
			if f.fsm.AppliedIndex() != 0 {
				t.Error("a failed install moved the applied index")
			}
			// Applies resume after a failed install (no lock left held).
			done := make(chan struct{})
			go func() { f.fsm.ApplyBatch([]*raft.Log{{Index: 1, Type: raft.LogNoop}}); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("apply blocked after a failed install")
			}
		})
	}
}

// fakeRaft lets Store's error mapping be tested without a cluster.
type fakeRaft struct {
	applyErr error
	resp     any
	block    bool
}

type fakeFuture struct {
	err   error
	resp  any
	block bool
}

func (f fakeFuture) Error() error {
	if f.block {
		select {}
	}
	return f.err
}
func (f fakeFuture) Response() any { return f.resp }
func (f fakeFuture) Index() uint64 { return 1 }
func (r *fakeRaft) Barrier(time.Duration) raft.Future {
	return fakeFuture{err: r.applyErr, block: r.block}
}
func (r *fakeRaft) Apply([]byte, time.Duration) raft.ApplyFuture {
	return fakeFuture{err: r.applyErr, resp: r.resp, block: r.block}
}

func TestStoreErrorMapping(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 4096})
	rejected := &RejectedError{Index: 3, Op: OpWrite, Target: tA, Err: ErrUnknownTarget}
	for _, tc := range []struct {
		name    string
		raft    *fakeRaft
		timeout time.Duration
		noReply bool
	}{
		{"committed", &fakeRaft{}, time.Second, false},
		{"not leader", &fakeRaft{applyErr: raft.ErrNotLeader}, time.Second, true},
		{"leadership lost", &fakeRaft{applyErr: raft.ErrLeadershipLost}, time.Second, true},
		{"enqueue timeout", &fakeRaft{applyErr: raft.ErrEnqueueTimeout}, time.Second, true},
		{"shutdown", &fakeRaft{applyErr: raft.ErrRaftShutdown}, time.Second, true},
		{"context deadline", &fakeRaft{block: true}, 20 * time.Millisecond, true},
		{"local fatal", &fakeRaft{resp: &FatalError{Index: 3, Err: syscall.EIO}}, time.Second, true},
		{"rejected", &fakeRaft{resp: rejected}, time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewReplicator(tc.raft, fx.fsm, ReplicatorOptions{}).Store(tA)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), tc.timeout)
			defer cancel()
			err = s.WriteAt(ctx, make([]byte, 512), 0)
			if got := errors.Is(err, aoe.ErrNoReply); got != tc.noReply {
				t.Fatalf("WriteAt: %v; ErrNoReply=%v, want %v", err, got, tc.noReply)
			}
			if tc.name == "committed" && err != nil {
				t.Fatal(err)
			}
			if tc.name == "rejected" && !errors.Is(err, ErrUnknownTarget) {
				t.Fatalf("rejected write: %v", err)
			}
			ferr := s.Flush(ctx)
			if tc.raft.applyErr != nil && !errors.Is(ferr, aoe.ErrNoReply) {
				t.Errorf("Flush: %v, want ErrNoReply", ferr)
			}
		})
	}
	if _, err := NewReplicator(&fakeRaft{}, fx.fsm, ReplicatorOptions{}).Store(tB); !errors.Is(err, ErrNoLocalImage) {
		t.Errorf("store for a target without an image: %v", err)
	}
}

func TestImageChecksum(t *testing.T) {
	a, b := newMemDisk(3<<20+512), newMemDisk(3<<20+512)
	ctx := context.Background()
	sa, _ := ImageChecksum(ctx, a)
	sb, _ := ImageChecksum(ctx, b)
	if sa != sb {
		t.Fatal("equal images, different checksums")
	}
	b.WriteAt(ctx, []byte{1}, 3<<20)
	sb, _ = ImageChecksum(ctx, b)
	if sa == sb {
		t.Fatal("a change in the last chunk did not change the checksum")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := ImageChecksum(cctx, a); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled checksum: %v", err)
	}
}

// fileDisk is a minimal file-backed aoe.Disk (pwrite into the page cache),
// standing in for storage.File in the benchmark.
type fileDisk struct {
	f    *os.File
	size int64
}

func (d *fileDisk) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := d.f.ReadAt(p, off)
	return err
}
func (d *fileDisk) WriteAt(_ context.Context, p []byte, off int64) error {
	_, err := d.f.WriteAt(p, off)
	return err
}
func (d *fileDisk) Flush(context.Context) error { return d.f.Sync() }
func (d *fileDisk) Size() int64                 { return d.size }

func BenchmarkApplyBatch(b *testing.B) {
	for _, kind := range []string{"mem", "file"} {
		for _, size := range []int{1024, 4096, 8704} {
			b.Run(fmt.Sprintf("%s/64x%dB", kind, size), func(b *testing.B) { benchApplyBatch(b, kind, size) })
		}
	}
}

func benchApplyBatch(b *testing.B, kind string, size int) {
	const batch = 64
	const image = 64 << 20
	fx := newFSMFixture(b, map[TargetID]int64{tA: image})
	if kind == "file" {
		f, err := os.Create(filepath.Join(b.TempDir(), "image"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(image); err != nil {
			b.Fatal(err)
		}
		fx.fsm = NewFSM(FSMOptions{Disks: map[TargetID]aoe.Disk{tA: &fileDisk{f: f, size: image}}})
	}
	fx.apply(b, Entry{Op: OpAddTarget, Target: tA, Size: image})
	logs := make([]*raft.Log, batch)
	for i := range logs {
		off := int64(i*size) % (image - int64(size))
		off -= off % SectorSize
		logs[i] = cmdLog(b, 0, Entry{Op: OpWrite, Target: tA, Offset: off, Data: pattern(i, size)})
	}
	b.SetBytes(int64(batch * size))
	b.ReportAllocs()
	next := uint64(2)
	for b.Loop() {
		for _, l := range logs {
			l.Index = next
			next++
		}
		if resps := fx.fsm.ApplyBatch(logs); resps[0] != nil {
			b.Fatal(resps[0])
		}
	}
}
