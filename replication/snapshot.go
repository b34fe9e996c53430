package replication

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sync"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// Snapshot stream format. A snapshot as stored locally is only its metadata;
// the stream a leader sends to a follower that needs the state is the same
// metadata with the image flag set, followed by every target's live image:
//
//	magic "VBSN" version(1) flags(1) bodyLen(4) body crc32c(4, over all before)
//	then, if flags&flagImage, for each target in body order:
//	    image bytes (exactly Size) crc32c(4, of those bytes as sent)
//
// body: index(8) count(4) then per target shelf(2) slot(1) size(8) state
// (state encoded as in a SetState entry) recent-write table (version 2:
// count(4) then per slot, oldest first, src(6) tag(4) offset(8) length(4)
// crc32c(4)). All integers big endian. Version 1 metadata (no tables) still
// decodes, with empty tables: it was written by a node that applied only
// version 1 entries, which carry no identity, so its tables were empty.
const (
	metaMagic         = "VBSN"
	metaVersion       = 2
	metaVersionLegacy = 1 // no recent-write tables
	metaFixed         = 4 + 1 + 1 + 4
	flagImage         = 1
	// maxMetaBody bounds the metadata of a corrupt or hostile stream. Real
	// metadata is a few KiB per target plus its recent-write table (at most
	// DedupWindow*26 bytes, about 210 KiB), so this admits over a thousand
	// targets. readMeta allocates as bytes arrive, not from the length.
	maxMetaBody = 256 << 20
)

// DefaultChunkSize is the unit in which images are read for a stream and
// written on install: large enough for sequential disk throughput, a multiple
// of every sector size.
const DefaultChunkSize = 1 << 20

type snapshotMeta struct {
	Index   uint64
	Targets []TargetInfo
	// Recent holds each target's recent-write table, oldest first (absent:
	// empty). It is replicated state: see DedupWindow.
	Recent map[TargetID][]recentWrite
	// version is the metadata version this was decoded from (0: current);
	// encode writes it back so that the format stays canonical.
	version byte
}

func (m *snapshotMeta) sort() {
	slices.SortFunc(m.Targets, func(a, b TargetInfo) int {
		switch {
		case a.ID.less(b.ID):
			return -1
		case b.ID.less(a.ID):
			return 1
		}
		return 0
	})
}

// imageBytes is the length of the image part of a stream.
func (m *snapshotMeta) imageBytes() int64 {
	var n int64
	for _, t := range m.Targets {
		n += t.Size + 4
	}
	return n
}

func (m *snapshotMeta) encode(image bool) []byte {
	version := m.version
	if version == 0 {
		version = metaVersion
	}
	body := binary.BigEndian.AppendUint64(nil, m.Index)
	body = binary.BigEndian.AppendUint32(body, uint32(len(m.Targets)))
	for _, t := range m.Targets {
		body = binary.BigEndian.AppendUint16(body, t.ID.Shelf)
		body = append(body, t.ID.Slot)
		body = binary.BigEndian.AppendUint64(body, uint64(t.Size))
		body = appendState(body, t.State)
		if version != metaVersionLegacy {
			body = appendRecent(body, m.Recent[t.ID])
		}
	}
	b := make([]byte, 0, metaFixed+len(body)+4)
	b = append(b, metaMagic...)
	b = append(b, version)
	var flags byte
	if image {
		flags |= flagImage
	}
	b = append(b, flags)
	b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// ErrCorruptSnapshot is wrapped by every error about unreadable snapshot
// metadata or a damaged image stream.
var ErrCorruptSnapshot = errors.New("corrupt snapshot")

func corruptSnap(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptSnapshot, fmt.Sprintf(format, args...))
}

// checkFixed validates the fixed-size start of the metadata.
func checkFixed(fixed []byte) error {
	if string(fixed[:4]) != metaMagic {
		return corruptSnap("bad magic %q (not a vblade-ha snapshot)", fixed[:4])
	}
	if fixed[4] != metaVersion && fixed[4] != metaVersionLegacy {
		return corruptSnap("metadata version %d, this node understands %d and %d: upgrade this node", fixed[4], metaVersionLegacy, metaVersion)
	}
	if n := binary.BigEndian.Uint32(fixed[6:]); n > maxMetaBody {
		return corruptSnap("metadata body of %d bytes (max %d)", n, maxMetaBody)
	}
	return nil
}

// readMeta reads exactly the metadata from the front of r and reports whether
// image data follows it.
func readMeta(r io.Reader) (snapshotMeta, bool, error) {
	var m snapshotMeta
	fixed := make([]byte, metaFixed)
	if _, err := io.ReadFull(r, fixed); err != nil {
		return m, false, corruptSnap("read metadata header: %v", err)
	}
	if err := checkFixed(fixed); err != nil {
		return m, false, err
	}
	n := binary.BigEndian.Uint32(fixed[6:])
	// Grow with what actually arrives: a corrupt length must not allocate
	// hundreds of MiB up front.
	var buf bytes.Buffer
	buf.Grow(int(min(n+4, 64<<10)))
	if _, err := io.CopyN(&buf, r, int64(n)+4); err != nil {
		return m, false, corruptSnap("read metadata body: %v", err)
	}
	rest := buf.Bytes()
	body := rest[:n]
	want := binary.BigEndian.Uint32(rest[n:])
	sum := crc32.Update(crc32.Checksum(fixed, castagnoli), castagnoli, body)
	if sum != want {
		return m, false, corruptSnap("metadata checksum mismatch (stored %08x, computed %08x)", want, sum)
	}
	if len(body) < 12 {
		return m, false, corruptSnap("metadata body truncated")
	}
	if fixed[4] != metaVersion {
		m.version = fixed[4]
	}
	m.Index = binary.BigEndian.Uint64(body)
	count := binary.BigEndian.Uint32(body[8:])
	p := body[12:]
	seen := make(map[TargetID]struct{})
	for i := uint32(0); i < count; i++ {
		if len(p) < 11 {
			return m, false, corruptSnap("metadata truncated at target %d of %d", i, count)
		}
		t := TargetInfo{
			ID:   TargetID{Shelf: binary.BigEndian.Uint16(p), Slot: p[2]},
			Size: int64(binary.BigEndian.Uint64(p[3:])),
		}
		if t.Size <= 0 || t.Size > maxImageSize || t.Size%SectorSize != 0 {
			return m, false, corruptSnap("target %v has impossible size %d", t.ID, t.Size)
		}
		if _, dup := seen[t.ID]; dup {
			return m, false, corruptSnap("target %v listed twice", t.ID)
		}
		seen[t.ID] = struct{}{}
		var err error
		if t.State, p, err = decodeState(p[11:]); err != nil {
			return m, false, corruptSnap("state of target %v: %v", t.ID, err)
		}
		if m.version != metaVersionLegacy {
			var recent []recentWrite
			if recent, p, err = decodeRecent(p, t.Size); err != nil {
				return m, false, fmt.Errorf("target %v: %w", t.ID, err)
			}
			if recent != nil {
				if m.Recent == nil {
					m.Recent = make(map[TargetID][]recentWrite)
				}
				m.Recent[t.ID] = recent
			}
		}
		m.Targets = append(m.Targets, t)
	}
	if len(p) != 0 {
		return m, false, corruptSnap("%d trailing metadata bytes", len(p))
	}
	return m, fixed[5]&flagImage != 0, nil
}

// Direction says which side of an image transfer a progress report is from.
type Direction uint8

const (
	Sending   Direction = 1 // this node (the leader) streams its image
	Receiving Direction = 2 // this node installs an image from the leader
)

func (d Direction) String() string {
	if d == Sending {
		return "sending"
	}
	return "receiving"
}

// TransferProgress reports a full-image transfer. Total counts the whole
// stream (metadata, images and their checksums); Bytes how much of it moved.
// The last report of a transfer has Done set, and Err when it failed.
type TransferProgress struct {
	Direction Direction
	Index     uint64 // snapshot index the image is replayed from
	Bytes     int64
	Total     int64
	Done      bool
	Err       error
}

// SnapshotStoreOptions configures a SnapshotStore.
type SnapshotStoreOptions struct {
	// Progress, if set, is called as full images are sent or received
	// (about once per chunk). It must not block for long.
	Progress func(TransferProgress)
	// ChunkSize overrides DefaultChunkSize; it must be a multiple of
	// SectorSize.
	ChunkSize int
}

// SnapshotStore is the raft.SnapshotStore the FSM needs. It keeps only the
// snapshot metadata in the wrapped store (the images are the live local
// files), but Open streams metadata plus the live image of every target, and
// a sink receiving such a stream writes the image into the local files as it
// arrives. See DESIGN.md for why a live (fuzzy) image is exact once the log
// after the snapshot index is replayed over it.
type SnapshotStore struct {
	// mu serialises committing a snapshot to inner with reading one back:
	// some stores (raft.InmemSnapshotStore) expose a snapshot to Open while
	// it is still being written.
	mu       sync.Mutex
	inner    raft.SnapshotStore
	fsm      *FSM
	progress func(TransferProgress)
	chunk    int
}

var _ raft.SnapshotStore = (*SnapshotStore)(nil)

// NewSnapshotStore wraps inner, which holds the metadata (a
// raft.FileSnapshotStore in production, raft.InmemSnapshotStore in tests).
func NewSnapshotStore(inner raft.SnapshotStore, fsm *FSM, opts SnapshotStoreOptions) *SnapshotStore {
	chunk := opts.ChunkSize
	if chunk <= 0 || chunk%SectorSize != 0 {
		chunk = DefaultChunkSize
	}
	return &SnapshotStore{inner: inner, fsm: fsm, progress: opts.Progress, chunk: chunk}
}

// NewFileSnapshotStore keeps the metadata of the last retain snapshots under
// dir with raft.FileSnapshotStore (logs go to logOutput, nil for stderr).
func NewFileSnapshotStore(dir string, retain int, logOutput io.Writer, fsm *FSM, opts SnapshotStoreOptions) (*SnapshotStore, error) {
	inner, err := raft.NewFileSnapshotStore(dir, retain, logOutput)
	if err != nil {
		return nil, fmt.Errorf("replication: open snapshot store in %s: %w", dir, err)
	}
	return NewSnapshotStore(inner, fsm, opts), nil
}

func (s *SnapshotStore) report(p TransferProgress) {
	if s.progress != nil {
		s.progress(p)
	}
}

// Create implements raft.SnapshotStore. The sink accepts either metadata alone
// (a local snapshot from Persist) or a full stream from a leader. The
// snapshot is created in the wrapped store only when the sink is closed, so an
// unfinished one is never visible to Open.
func (s *SnapshotStore) Create(version raft.SnapshotVersion, index, term uint64, configuration raft.Configuration,
	configurationIndex uint64, trans raft.Transport) (raft.SnapshotSink, error) {
	create := func() (raft.SnapshotSink, error) {
		return s.inner.Create(version, index, term, configuration, configurationIndex, trans)
	}
	return &imageSink{store: s, create: create, index: index}, nil
}

// List implements raft.SnapshotStore. Sizes are those of the metadata only.
func (s *SnapshotStore) List() ([]*raft.SnapshotMeta, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inner.List()
}

// commit writes the metadata of a finished snapshot to the wrapped store.
func (s *SnapshotStore) commit(create func() (raft.SnapshotSink, error), meta []byte) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sink, err := create()
	if err != nil {
		return "", fmt.Errorf("create: %w", err)
	}
	if _, err := sink.Write(meta); err != nil {
		sink.Cancel()
		return "", fmt.Errorf("write metadata: %w", err)
	}
	if err := sink.Close(); err != nil {
		return "", err
	}
	return sink.ID(), nil
}

// Open implements raft.SnapshotStore. The returned reader yields the metadata
// and then, lazily, the live image of every target, so a Restore that reads
// only the metadata (start-up, or after an install) copies no image byte,
// while a leader sending the snapshot streams the images. The reported Size
// is the length of the whole stream, as InstallSnapshot requires.
func (s *SnapshotStore) Open(id string) (*raft.SnapshotMeta, io.ReadCloser, error) {
	s.mu.Lock()
	rmeta, rc, err := s.inner.Open(id)
	if err != nil {
		s.mu.Unlock()
		return nil, nil, fmt.Errorf("replication: open snapshot %s: %w", id, err)
	}
	meta, _, err := readMeta(rc)
	rc.Close()
	s.mu.Unlock()
	if err != nil {
		return nil, nil, fmt.Errorf("replication: open snapshot %s: %w", id, err)
	}
	// Raft's index is authoritative: it may be past the FSM's own count by
	// barrier entries, which change nothing in the images.
	meta.Index = rmeta.Index
	st := &imageStream{store: s, index: meta.Index, head: meta.encode(true)}
	for _, t := range meta.Targets {
		d := s.fsm.Disk(t.ID)
		if d == nil {
			return nil, nil, fmt.Errorf("replication: open snapshot %s: no local image for %v", id, t.ID)
		}
		st.targets = append(st.targets, streamTarget{id: t.ID, disk: d, size: t.Size})
	}
	st.total = int64(len(st.head)) + meta.imageBytes()
	out := *rmeta
	out.Size = st.total
	return &out, st, nil
}

type streamTarget struct {
	id   TargetID
	disk aoe.Disk
	size int64
}

// imageStream is the reader Open returns.
type imageStream struct {
	store   *SnapshotStore
	index   uint64
	head    []byte // metadata not yet read
	targets []streamTarget
	total   int64
	sent    int64

	ti      int   // current target
	off     int64 // next image offset to read from the current target
	buf     []byte
	pending []byte // read from the image, not yet returned
	crc     uint32
	trailer []byte // checksum bytes not yet returned

	held   bool // counted in fsm.streams
	closed bool
	done   bool // final progress reported
}

// hold postpones snapshots (and so log compaction) from the first image byte
// until the stream ends. Reading only the metadata holds nothing, which is
// what makes Restore through Open free.
func (st *imageStream) hold() {
	if !st.held {
		st.held = true
		st.store.fsm.streams.Add(1)
	}
}

func (st *imageStream) release() {
	if st.held {
		st.held = false
		st.store.fsm.streams.Add(-1)
	}
}

func (st *imageStream) Read(p []byte) (int, error) {
	if st.closed {
		return 0, errors.New("replication: read from closed snapshot stream")
	}
	n := 0
	for n < len(p) {
		switch {
		case len(st.head) > 0:
			c := copy(p[n:], st.head)
			st.head = st.head[c:]
			n += c
		case len(st.pending) > 0:
			c := copy(p[n:], st.pending)
			st.pending = st.pending[c:]
			n += c
		case len(st.trailer) > 0:
			c := copy(p[n:], st.trailer)
			st.trailer = st.trailer[c:]
			n += c
			if len(st.trailer) == 0 {
				st.ti, st.off, st.crc = st.ti+1, 0, 0
			}
		case st.ti >= len(st.targets):
			st.sent += int64(n)
			st.release()
			if !st.done {
				st.done = true
				st.store.report(TransferProgress{Direction: Sending, Index: st.index, Bytes: st.sent, Total: st.total, Done: true})
			}
			if n > 0 {
				return n, nil
			}
			return 0, io.EOF
		case st.off < st.targets[st.ti].size:
			if err := st.fill(); err != nil {
				st.sent += int64(n)
				return n, err
			}
		default:
			st.trailer = binary.BigEndian.AppendUint32(make([]byte, 0, 4), st.crc)
		}
	}
	st.sent += int64(n)
	return n, nil
}

// fill reads the next chunk of the current target's live image.
func (st *imageStream) fill() error {
	st.hold()
	t := st.targets[st.ti]
	if st.buf == nil {
		st.buf = make([]byte, st.store.chunk)
	}
	c := int64(len(st.buf))
	if rem := t.size - st.off; rem < c {
		c = rem
	}
	chunk := st.buf[:c]
	if err := t.disk.ReadAt(context.Background(), chunk, st.off); err != nil {
		err = fmt.Errorf("replication: stream image of %v: read %d bytes at %d: %w", t.id, c, st.off, err)
		st.done = true
		st.store.report(TransferProgress{Direction: Sending, Index: st.index, Bytes: st.sent, Total: st.total, Done: true, Err: err})
		return err
	}
	st.crc = crc32.Update(st.crc, castagnoli, chunk)
	st.off += c
	st.pending = chunk
	st.store.report(TransferProgress{Direction: Sending, Index: st.index, Bytes: st.sent, Total: st.total})
	return nil
}

func (st *imageStream) Close() error {
	if !st.closed {
		st.closed = true
		st.release()
	}
	return nil
}

// imageSink receives a snapshot: metadata alone from Persist, or a full
// stream from a leader, whose images it writes straight into the local files.
type imageSink struct {
	store  *SnapshotStore
	create func() (raft.SnapshotSink, error) // the wrapped store's Create, deferred to Close
	id     string                            // set by a successful Close
	index  uint64

	head    []byte // metadata bytes collected so far
	meta    snapshotMeta
	gotMeta bool
	image   bool // a full image follows the metadata

	installing bool // FSM applies are blocked (beginInstall)
	ti         int
	off        int64
	buf        []byte // image bytes not yet written
	crc        uint32
	trailer    []byte
	received   int64
	total      int64

	err      error // sticky: the first failure
	finished bool
}

// ID implements raft.SnapshotSink; Raft asks for it only after Close.
func (k *imageSink) ID() string { return k.id }

func (k *imageSink) fail(err error) error {
	if k.err == nil {
		k.err = err
		if k.image {
			k.store.report(TransferProgress{Direction: Receiving, Index: k.index, Bytes: k.received, Total: k.total, Done: true, Err: err})
		}
	}
	return k.err
}

func (k *imageSink) Write(p []byte) (int, error) {
	if k.err != nil {
		return 0, k.err
	}
	if k.finished {
		return 0, errors.New("replication: write to a closed snapshot sink")
	}
	n := len(p)
	for len(p) > 0 {
		if !k.gotMeta {
			p = k.collectMeta(p)
			if k.err != nil {
				return 0, k.err
			}
			continue
		}
		if !k.image || k.ti >= len(k.meta.Targets) {
			return 0, k.fail(corruptSnap("%d bytes after the end of the snapshot stream", len(p)))
		}
		t := k.meta.Targets[k.ti]
		if k.off < t.Size {
			c := min(int64(len(p)), t.Size-k.off, int64(k.store.chunk-len(k.buf)))
			k.buf = append(k.buf, p[:c]...)
			p = p[c:]
			k.received += c
			if len(k.buf) == k.store.chunk || k.off+int64(len(k.buf)) == t.Size {
				if err := k.flushChunk(t); err != nil {
					return 0, err
				}
			}
			continue
		}
		c := min(len(p), 4-len(k.trailer))
		k.trailer = append(k.trailer, p[:c]...)
		p = p[c:]
		k.received += int64(c)
		if len(k.trailer) == 4 {
			if want := binary.BigEndian.Uint32(k.trailer); want != k.crc {
				return 0, k.fail(corruptSnap("image of %v: checksum mismatch (sent %08x, received %08x)", t.ID, want, k.crc))
			}
			k.ti, k.off, k.crc, k.trailer = k.ti+1, 0, 0, k.trailer[:0]
		}
	}
	return n, nil
}

// collectMeta accumulates the metadata and consumes no more of p than it.
func (k *imageSink) collectMeta(p []byte) []byte {
	need := metaFixed
	if len(k.head) >= metaFixed {
		// Check magic, version and length before trusting the length.
		if err := checkFixed(k.head[:metaFixed]); err != nil {
			k.fail(fmt.Errorf("replication: receive snapshot %d: %w", k.index, err))
			return nil
		}
		need += int(binary.BigEndian.Uint32(k.head[6:])) + 4
	}
	c := min(len(p), need-len(k.head))
	k.head = append(k.head, p[:c]...)
	p = p[c:]
	if len(k.head) < need || need == metaFixed {
		return p // header or body still incomplete (or body length just learned)
	}
	meta, image, err := readMeta(bytes.NewReader(k.head))
	if err != nil {
		k.fail(fmt.Errorf("replication: receive snapshot %d: %w", k.index, err))
		return nil
	}
	k.meta, k.image, k.gotMeta = meta, image, true
	k.received = int64(len(k.head))
	if !image {
		return p
	}
	k.total = int64(len(k.head)) + meta.imageBytes()
	for _, t := range meta.Targets {
		if err := k.store.fsm.checkLocal(t.ID, t.Size); err != nil {
			k.fail(fmt.Errorf("replication: cannot install the leader's image: %w", err))
			return nil
		}
	}
	k.store.fsm.beginInstall()
	k.installing = true
	k.store.report(TransferProgress{Direction: Receiving, Index: k.index, Bytes: k.received, Total: k.total})
	return p
}

func (k *imageSink) flushChunk(t TargetInfo) error {
	d := k.store.fsm.Disk(t.ID)
	if err := d.WriteAt(context.Background(), k.buf, k.off); err != nil {
		return k.fail(fmt.Errorf("replication: install image of %v: write %d bytes at %d: %w", t.ID, len(k.buf), k.off, err))
	}
	k.crc = crc32.Update(k.crc, castagnoli, k.buf)
	k.off += int64(len(k.buf))
	k.buf = k.buf[:0]
	k.store.report(TransferProgress{Direction: Receiving, Index: k.index, Bytes: k.received, Total: k.total})
	return nil
}

// Close syncs an installed image before it commits the metadata: once the
// metadata is durable, a restart trusts the local image to be at least as new
// as its index.
func (k *imageSink) Close() error {
	if k.finished {
		return nil
	}
	if k.err == nil && !k.gotMeta {
		k.fail(corruptSnap("snapshot stream ended inside the metadata"))
	}
	if k.err == nil && k.image && k.ti < len(k.meta.Targets) {
		k.fail(corruptSnap("snapshot stream ended at %d of %d bytes", k.received, k.total))
	}
	if k.err == nil && k.image {
		for _, t := range k.meta.Targets {
			if err := k.store.fsm.Disk(t.ID).Flush(context.Background()); err != nil {
				k.fail(fmt.Errorf("replication: install image of %v: sync: %w", t.ID, err))
				break
			}
		}
	}
	if k.err != nil {
		k.Cancel()
		return k.err
	}
	k.finished = true
	k.meta.Index = k.index
	id, err := k.store.commit(k.create, k.meta.encode(false))
	if err != nil {
		k.end(false)
		return fmt.Errorf("replication: commit snapshot %d: %w", k.index, err)
	}
	k.id = id
	k.end(true)
	if k.image {
		k.store.report(TransferProgress{Direction: Receiving, Index: k.index, Bytes: k.received, Total: k.total, Done: true})
	}
	return nil
}

// Cancel implements raft.SnapshotSink; it may be called more than once.
func (k *imageSink) Cancel() error {
	if k.finished {
		return nil
	}
	k.finished = true
	k.fail(errors.New("snapshot transfer cancelled"))
	k.end(false)
	return nil
}

func (k *imageSink) end(ok bool) {
	if k.installing {
		k.installing = false
		k.store.fsm.endInstall(k.index, ok)
	}
}
