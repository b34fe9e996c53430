package aoe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// FirmwareVersion is what Query Config reports. It is vblade 25's value
// (0x4000 + 25): initiators print it and some scripts match on it, and we are
// a drop-in for that version.
const FirmwareVersion = 0x4019

// DefaultBufferCount is vblade's default -b: the number of frames an
// initiator may keep outstanding.
const DefaultBufferCount = 16

// TargetConfig describes one exported shelf.slot.
type TargetConfig struct {
	Shelf uint16
	Slot  uint8
	Disk  Disk
	// ReadOnly refuses writes with an ATA abort, as vblade -r does.
	ReadOnly bool
	// BufferCount is advertised in Query Config (0: DefaultBufferCount).
	BufferCount int
	// Serial, Model and Firmware fill IDENTIFY DEVICE. Serial defaults to
	// vblade's "shelf.slot:hostname".
	Serial, Model, Firmware string
	// State makes config string, mask list and reservations durable; nil
	// keeps them in memory only.
	State StateStore
	// Initial is the state to start with (loaded from the state store).
	Initial TargetState
	// Gate closes the target on a node that must not answer; nil is open.
	Gate Gate
	// MAC, if set, is the source address of every response and
	// announcement instead of the interface's own (the virtual MAC that
	// moves with cluster leadership).
	MAC MAC
	// Observe, if set, is called once per answered command with its kind
	// and the time from the frame's arrival to the answer leaving (the
	// latency metrics). It must not block.
	Observe func(kind CommandKind, d time.Duration)
	Logger  *slog.Logger
}

// CommandKind classifies a command for latency accounting.
type CommandKind uint8

// Command kinds.
const (
	KindRead CommandKind = iota
	KindWrite
	KindFlush
	KindOther
)

func (k CommandKind) String() string {
	switch k {
	case KindRead:
		return "read"
	case KindWrite:
		return "write"
	case KindFlush:
		return "flush"
	}
	return "other"
}

// kindOf classifies a request frame (before it is answered in place).
func kindOf(b []byte) CommandKind {
	if len(b) < ATAHeaderLen || Command(b[19]) != CmdATA {
		return KindOther
	}
	switch b[27] {
	case ATACmdReadSectors, ATACmdReadSectorsExt:
		return KindRead
	case ATACmdWriteSectors, ATACmdWriteSectorsExt:
		return KindWrite
	case ATACmdFlushCache, ATACmdFlushCacheExt:
		return KindFlush
	}
	return KindOther
}

// TargetStats counts what a target did. All fields are updated atomically.
type TargetStats struct {
	Reads, Writes, Flushes, Other atomic.Uint64 // ATA commands answered
	ReadBytes, WriteBytes         atomic.Uint64
	ATAErrors                     atomic.Uint64 // ABRT/IDNF answers
	AoEErrors                     atomic.Uint64 // AoE error responses
	Dropped                       atomic.Uint64 // commands left unanswered (gate closed, ErrNoReply, masked)
}

// Target is the protocol engine of one shelf.slot: it turns a request frame
// into its response in place. It holds no socket; a Server feeds it.
type Target struct {
	addr        TargetAddr
	disk        Disk
	once        DedupWriter // disk as a DedupWriter, nil if it is not one
	sectors     uint64
	readOnly    bool
	bufferCount uint16
	gate        Gate
	mac         MAC
	store       StateStore
	observe     func(CommandKind, time.Duration)
	log         *slog.Logger
	identify    [512]byte

	state   atomic.Pointer[TargetState]
	stateMu sync.Mutex // serialises state changes across Commit

	Stats TargetStats
}

// NewTarget checks cfg and builds a Target.
func NewTarget(cfg TargetConfig) (*Target, error) {
	if cfg.Disk == nil {
		return nil, errors.New("aoe: target needs a disk")
	}
	if cfg.Shelf == BroadcastShelf || cfg.Slot == BroadcastSlot {
		return nil, fmt.Errorf("aoe: shelf %d slot %d: 65535 and 255 are the broadcast addresses", cfg.Shelf, cfg.Slot)
	}
	size := cfg.Disk.Size()
	if size < SectorSize {
		return nil, fmt.Errorf("aoe: e%d.%d: disk of %d bytes is smaller than one sector", cfg.Shelf, cfg.Slot, size)
	}
	bc := cfg.BufferCount
	if bc <= 0 {
		bc = DefaultBufferCount
	}
	if bc > 0xffff {
		return nil, fmt.Errorf("aoe: buffer count %d exceeds 65535", bc)
	}
	if err := validateState(cfg.Initial); err != nil {
		return nil, err
	}
	t := &Target{
		addr:        TargetAddr{cfg.Shelf, cfg.Slot},
		disk:        cfg.Disk,
		sectors:     uint64(size / SectorSize),
		readOnly:    cfg.ReadOnly,
		bufferCount: uint16(bc),
		gate:        cfg.Gate,
		mac:         cfg.MAC,
		store:       cfg.State,
		observe:     cfg.Observe,
		log:         cfg.Logger,
	}
	t.once, _ = cfg.Disk.(DedupWriter)
	if t.log == nil {
		t.log = slog.Default()
	}
	t.log = t.log.With("target", t.addr.String())
	serial := cfg.Serial
	if serial == "" {
		host, _ := os.Hostname()
		serial = fmt.Sprintf("%d.%d:%s", cfg.Shelf, cfg.Slot, host)
	}
	model := cfg.Model
	if model == "" {
		model = "vblade-ha AoE target"
	}
	fw := cfg.Firmware
	if fw == "" {
		fw = "V25"
	}
	buildIdentify(&t.identify, t.sectors, serial, model, fw)
	s := cfg.Initial.Clone()
	t.state.Store(&s)
	return t, nil
}

func validateState(s TargetState) error {
	if len(s.Config) > MaxConfigLen {
		return fmt.Errorf("aoe: config string of %d bytes exceeds %d", len(s.Config), MaxConfigLen)
	}
	if len(s.Masks) > MaxMasks {
		return fmt.Errorf("aoe: mask list of %d MACs exceeds %d", len(s.Masks), MaxMasks)
	}
	if len(s.Reservations) > MaxReservations {
		return fmt.Errorf("aoe: reservation of %d MACs exceeds %d", len(s.Reservations), MaxReservations)
	}
	return nil
}

// Addr is the target's shelf.slot.
func (t *Target) Addr() TargetAddr { return t.addr }

// Disk is the target's backing store.
func (t *Target) Disk() Disk { return t.disk }

// Sectors is the exported size in 512-byte sectors.
func (t *Target) Sectors() uint64 { return t.sectors }

// MAC is the target's own source MAC, zero when it uses the interface's.
func (t *Target) MAC() MAC { return t.mac }

// State returns the current target state. Callers must not modify it.
func (t *Target) State() TargetState { return *t.state.Load() }

// SetState publishes s as the target's state without committing it: a cluster
// follower calls it when it applies a state entry from the log.
func (t *Target) SetState(s TargetState) error {
	if err := validateState(s); err != nil {
		return err
	}
	c := s.Clone()
	t.state.Store(&c)
	return nil
}

// open reports whether the target may answer now.
func (t *Target) open() bool { return t.gate == nil || t.gate.Open() }

// Serving reports whether the target's gate is open.
func (t *Target) Serving() bool { return t.open() }

// commitState makes s durable and then publishes it. The caller holds stateMu.
func (t *Target) commitState(ctx context.Context, s TargetState) error {
	if t.store != nil {
		if err := t.store.Commit(ctx, t.addr.Shelf, t.addr.Slot, s); err != nil {
			return err
		}
	}
	t.state.Store(&s)
	return nil
}

// handle turns the request frame b[:n] into its response in place and
// returns the response length, or 0 when the request gets no answer. b must
// have room for a full response (the Server's buffers do). src is the MAC to
// answer from when the target has none of its own; maxSectors is what the
// interface MTU allows per frame.
func (t *Target) handle(ctx context.Context, b []byte, n int, src MAC, maxSectors int) int {
	if !t.open() {
		t.Stats.Dropped.Add(1)
		return 0
	}
	var from MAC
	copy(from[:], b[6:12])
	st := t.state.Load()
	if len(st.Masks) > 0 && !containsMAC(st.Masks, from) {
		t.Stats.Dropped.Add(1)
		return 0
	}
	var rlen int
	if b[14]>>4 != Version {
		// r11 answers a version it does not speak with error 5, so an
		// initiator from the future learns why instead of timing out.
		// (vblade ignores the field.)
		setError(b, ErrCodeBadVersion)
		t.Stats.AoEErrors.Add(1)
		rlen = HeaderLen
	} else {
		rlen = t.dispatch(ctx, b, n, from, st, maxSectors)
	}
	if rlen <= 0 {
		t.Stats.Dropped.Add(1)
		return 0
	}
	// A deposed leader must not answer even a command it finished: the
	// gate is checked again right before the reply leaves.
	if !t.open() {
		t.Stats.Dropped.Add(1)
		return 0
	}
	if t.mac != (MAC{}) {
		src = t.mac
	}
	copy(b[0:6], from[:])
	copy(b[6:12], src[:])
	b[14] = Version<<4 | FlagResponse | b[14]&FlagError
	binary.BigEndian.PutUint16(b[16:18], t.addr.Shelf)
	b[18] = t.addr.Slot
	if rlen < MinFrameLen {
		clear(b[rlen:MinFrameLen])
		rlen = MinFrameLen
	}
	return rlen
}

// dispatch runs the command of a request that passed the gate, mask and
// version checks and returns the response length (0: no answer).
func (t *Target) dispatch(ctx context.Context, b []byte, n int, from MAC, st *TargetState, maxSectors int) int {
	switch Command(b[19]) {
	case CmdATA:
		if n < ATAHeaderLen {
			return 0
		}
		return t.doATA(ctx, b, n, from, st, maxSectors)
	case CmdQueryConfig:
		if n < ConfigHeaderLen {
			return 0
		}
		return t.doConfig(ctx, b, n, maxSectors)
	case CmdMaskList:
		if n < MaskHeaderLen {
			return 0
		}
		return t.doMask(ctx, b, n)
	case CmdReserve:
		if n < ReserveHeaderLen {
			return 0
		}
		return t.doReserve(ctx, b, n, from)
	}
	// vblade echoes the whole request with the error set.
	setError(b, ErrCodeBadCommand)
	t.Stats.AoEErrors.Add(1)
	return n
}

func setError(b []byte, code ErrorCode) {
	b[14] |= FlagError
	b[15] = byte(code)
}

// ATA register errors.
const maxLBA28 = 0x0fffffff

// doATA runs one ATA command. It mirrors vblade's aoeata/atacmd, including
// which failures are AoE errors (BadArg) and which are ATA status errors.
func (t *Target) doATA(ctx context.Context, b []byte, n int, from MAC, st *TargetState, maxSectors int) int {
	aflags := b[24]
	count := int(b[26])
	cmd := b[27]
	lba := getLBA(b[28:34])
	if cmd != ATACmdIdentify && len(st.Reservations) > 0 && !containsMAC(st.Reservations, from) {
		setError(b, ErrCodeTargetReserved)
		t.Stats.AoEErrors.Add(1)
		return ATAHeaderLen
	}
	status, errReg := byte(ATAStatusReady), byte(0)
	rlen := ATAHeaderLen
	switch cmd {
	default:
		status, errReg = ATAStatusReady|ATAStatusError, ATAErrAbort
		t.Stats.ATAErrors.Add(1)
	case ATACmdFlushCache, ATACmdFlushCacheExt:
		if err := t.disk.Flush(ctx); err != nil {
			if t.silent(err, "flush") {
				return 0
			}
			status, errReg = ATAStatusReady|ATAStatusError, ATAErrAbort
			t.Stats.ATAErrors.Add(1)
		}
		t.Stats.Flushes.Add(1)
	case ATACmdIdentify:
		if count != 1 || len(b) < ATAHeaderLen+SectorSize {
			return t.badArg(b)
		}
		copy(b[ATAHeaderLen:], t.identify[:])
		count = 0
		rlen = ATAHeaderLen + SectorSize
		t.Stats.Other.Add(1)
	case ATACmdCheckPowerMode:
		count = 0xff // active or idle
		t.Stats.Other.Add(1)
	case ATACmdReadSectors, ATACmdWriteSectors, ATACmdReadSectorsExt, ATACmdWriteSectorsExt:
		if cmd == ATACmdReadSectors || cmd == ATACmdWriteSectors {
			lba &= maxLBA28
		}
		nbytes := count * SectorSize
		if count > maxSectors || ATAHeaderLen+nbytes > len(b) {
			return t.badArg(b)
		}
		if lba+uint64(count) > t.sectors {
			status, errReg = ATAStatusReady|ATAStatusError, ATAErrIDNotFound
			t.Stats.ATAErrors.Add(1)
			break
		}
		data := b[ATAHeaderLen : ATAHeaderLen+nbytes]
		off := int64(lba) * SectorSize
		if cmd == ATACmdReadSectors || cmd == ATACmdReadSectorsExt {
			if err := t.disk.ReadAt(ctx, data, off); err != nil {
				if t.silent(err, "read") {
					return 0
				}
				status, errReg = ATAStatusReady|ATAStatusError, ATAErrAbort
				t.Stats.ATAErrors.Add(1)
				break
			}
			rlen += nbytes
			t.Stats.Reads.Add(1)
			t.Stats.ReadBytes.Add(uint64(nbytes))
		} else {
			// The frame must carry every sector it announces.
			if n-ATAHeaderLen < nbytes {
				return t.badArg(b)
			}
			if t.readOnly {
				status, errReg = ATAStatusReady|ATAStatusError, ATAErrAbort
				t.Stats.ATAErrors.Add(1)
				break
			}
			var err error
			if t.once != nil {
				// A retransmission (same source and tag) of a write the
				// disk already applied is acknowledged, not applied again.
				id := RequestID{Src: from, Tag: binary.BigEndian.Uint32(b[20:24])}
				err = t.once.WriteAtOnce(ctx, data, off, id)
			} else {
				err = t.disk.WriteAt(ctx, data, off)
			}
			if err != nil {
				if t.silent(err, "write") {
					return 0
				}
				status, errReg = ATAStatusReady|ATAStatusError, ATAErrAbort
				t.Stats.ATAErrors.Add(1)
				break
			}
			t.Stats.Writes.Add(1)
			t.Stats.WriteBytes.Add(uint64(nbytes))
		}
		count = 0
	}
	_ = aflags
	b[25] = errReg
	b[26] = byte(count)
	b[27] = status
	return rlen
}

func (t *Target) badArg(b []byte) int {
	setError(b, ErrCodeBadArg)
	t.Stats.AoEErrors.Add(1)
	return ATAHeaderLen
}

// silent reports whether err means "do not answer"; other errors are logged
// and answered with an ATA abort by the caller.
func (t *Target) silent(err error, op string) bool {
	if errors.Is(err, ErrNoReply) || errors.Is(err, context.Canceled) {
		return true
	}
	if !errors.Is(err, ErrReadOnly) {
		t.log.Warn("disk I/O failed; answering ATA abort", "op", op, "err", err)
	}
	return false
}

// doConfig answers Query Config. test and prefix are silent when they do
// not match (that is how an initiator finds targets by config string); set
// fails with ConfigSet when a different string is already there.
func (t *Target) doConfig(ctx context.Context, b []byte, n int, maxSectors int) int {
	qcmd := ConfigCommand(b[29] & 0x0f)
	clen := int(binary.BigEndian.Uint16(b[30:32]))
	payload := b[ConfigHeaderLen:n]
	if qcmd != ConfigRead && (clen > MaxConfigLen || clen > len(payload)) {
		return 0 // vblade: "if you can't play nice ..."
	}
	st := t.state.Load()
	switch qcmd {
	case ConfigRead:
	case ConfigTest:
		if clen != len(st.Config) || string(payload[:clen]) != string(st.Config) {
			return 0
		}
	case ConfigPrefix:
		if clen > len(st.Config) || string(payload[:clen]) != string(st.Config[:clen]) {
			return 0
		}
	case ConfigSet, ConfigForceSet:
		t.stateMu.Lock()
		st = t.state.Load()
		if qcmd == ConfigSet && len(st.Config) > 0 && string(payload[:clen]) != string(st.Config) {
			t.stateMu.Unlock()
			setError(b, ErrCodeConfigSet)
			t.Stats.AoEErrors.Add(1)
			break
		}
		ns := st.Clone()
		ns.Config = append(ns.Config[:0], payload[:clen]...)
		err := t.commitState(ctx, ns)
		t.stateMu.Unlock()
		if err != nil {
			t.logStateErr(err)
			return 0
		}
		st = t.state.Load()
	default:
		setError(b, ErrCodeBadArg)
		t.Stats.AoEErrors.Add(1)
	}
	return t.fillConfig(b, st, qcmd, maxSectors)
}

// fillConfig writes the Query Config response body (after the common header)
// and returns the frame length.
func (t *Target) fillConfig(b []byte, st *TargetState, qcmd ConfigCommand, maxSectors int) int {
	binary.BigEndian.PutUint16(b[24:26], t.bufferCount)
	binary.BigEndian.PutUint16(b[26:28], FirmwareVersion)
	b[28] = byte(maxSectors)
	b[29] = Version<<4 | byte(qcmd)&0x0f
	binary.BigEndian.PutUint16(b[30:32], uint16(len(st.Config)))
	copy(b[ConfigHeaderLen:], st.Config)
	return ConfigHeaderLen + len(st.Config)
}

func (t *Target) logStateErr(err error) {
	if !errors.Is(err, ErrNoReply) {
		t.log.Warn("target state not saved; request left unanswered", "err", err)
	}
}

// doMask runs a Mac Mask List read or edit, following vblade: directives
// apply in order; a full list or a bad directive stops the edit there and
// reports how many directives were applied.
func (t *Target) doMask(ctx context.Context, b []byte, n int) int {
	mcmd := MaskCommand(b[25])
	switch mcmd {
	case MaskRead:
	case MaskEdit:
		ndir := int(b[27])
		if MaskHeaderLen+ndir*directiveLen > n {
			setError(b, ErrCodeBadArg)
			t.Stats.AoEErrors.Add(1)
			return MaskHeaderLen
		}
		t.stateMu.Lock()
		ns := t.state.Load().Clone()
		var merr MaskError
		applied := ndir
		for i := 0; i < ndir && merr == 0; i++ {
			d := b[MaskHeaderLen+i*directiveLen:]
			var mac MAC
			copy(mac[:], d[2:8])
			switch DirectiveCommand(d[1]) {
			case DirNone:
			case DirAdd:
				if containsMAC(ns.Masks, mac) {
					continue
				}
				if len(ns.Masks) >= MaxMasks {
					merr, applied = MaskErrListFull, i
					continue
				}
				ns.Masks = append(ns.Masks, mac)
			case DirDelete:
				for j, m := range ns.Masks {
					if m == mac {
						ns.Masks = append(ns.Masks[:j], ns.Masks[j+1:]...)
						break
					}
				}
			default:
				merr, applied = MaskErrBadDirective, i
			}
		}
		var err error
		if !ns.Equal(*t.state.Load()) {
			err = t.commitState(ctx, ns)
		}
		t.stateMu.Unlock()
		if err != nil {
			t.logStateErr(err)
			return 0
		}
		if merr != 0 {
			b[26] = byte(merr)
			b[27] = byte(applied)
			return MaskHeaderLen
		}
	default:
		setError(b, ErrCodeBadArg)
		t.Stats.AoEErrors.Add(1)
		return MaskHeaderLen
	}
	st := t.state.Load()
	if MaskHeaderLen+len(st.Masks)*directiveLen > len(b) {
		return 0
	}
	b[26] = 0
	b[27] = byte(len(st.Masks))
	for i, m := range st.Masks {
		d := b[MaskHeaderLen+i*directiveLen:]
		d[0], d[1] = 0, 0
		copy(d[2:8], m[:])
	}
	return MaskHeaderLen + len(st.Masks)*directiveLen
}

// doReserve runs Reserve/Release. set succeeds only for a current holder (or
// when nothing is reserved); force set always; an empty list releases. The
// current list is returned in every case, errors included, as vblade does.
func (t *Target) doReserve(ctx context.Context, b []byte, n int, from MAC) int {
	rcmd := ReserveCommand(b[24])
	switch rcmd {
	case ReserveRead:
	case ReserveSet, ReserveForceSet:
		t.stateMu.Lock()
		st := t.state.Load()
		if rcmd == ReserveSet && len(st.Reservations) > 0 && !containsMAC(st.Reservations, from) {
			t.stateMu.Unlock()
			setError(b, ErrCodeTargetReserved)
			t.Stats.AoEErrors.Add(1)
			break
		}
		nmacs := int(b[25])
		if ReserveHeaderLen+nmacs*6 > n {
			t.stateMu.Unlock()
			setError(b, ErrCodeBadArg)
			t.Stats.AoEErrors.Add(1)
			break
		}
		ns := st.Clone()
		ns.Reservations = ns.Reservations[:0]
		for i := 0; i < nmacs; i++ {
			var m MAC
			copy(m[:], b[ReserveHeaderLen+i*6:])
			ns.Reservations = append(ns.Reservations, m)
		}
		err := t.commitState(ctx, ns)
		t.stateMu.Unlock()
		if err != nil {
			t.logStateErr(err)
			return 0
		}
	default:
		setError(b, ErrCodeBadArg)
		t.Stats.AoEErrors.Add(1)
	}
	st := t.state.Load()
	if ReserveHeaderLen+len(st.Reservations)*6 > len(b) {
		return 0
	}
	b[25] = byte(len(st.Reservations))
	for i, m := range st.Reservations {
		copy(b[ReserveHeaderLen+i*6:], m[:])
	}
	return ReserveHeaderLen + len(st.Reservations)*6
}

// buildIdentify fills the 512-byte IDENTIFY DEVICE block. Words follow
// vblade's, plus the FLUSH CACHE EXT bits, since we implement that command.
func buildIdentify(id *[512]byte, sectors uint64, serial, model, firmware string) {
	setWord := func(w int, v uint16) { binary.LittleEndian.PutUint16(id[2*w:], v) }
	setWord(47, 0x8000)
	setWord(49, 0x0200) // LBA supported
	setWord(50, 0x4000)
	setWord(83, 0x7400) // LBA48, FLUSH CACHE EXT, FLUSH CACHE supported
	setWord(84, 0x4000)
	setWord(86, 0x3400) // ... and enabled
	setWord(87, 0x4000)
	setWord(93, 0x400b)
	setString(id[20:40], serial)   // words 10-19
	setString(id[46:54], firmware) // words 23-26
	setString(id[54:94], model)    // words 27-46
	lba28 := sectors
	if lba28 > maxLBA28 {
		lba28 = maxLBA28
	}
	binary.LittleEndian.PutUint32(id[120:124], uint32(lba28)) // words 60-61
	for i := 0; i < 6; i++ {                                  // words 100-103
		id[200+i] = byte(sectors >> (8 * i))
	}
}

// setString stores an ATA string: space padded, bytes swapped in each word.
func setString(dst []byte, s string) {
	for i := range dst {
		dst[i] = ' '
	}
	for i := 0; i < len(dst) && i < len(s); i++ {
		dst[i^1] = s[i]
	}
}
