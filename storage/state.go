package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// stateVersion is the format version of target state files. Load refuses
// other versions rather than guess at their meaning.
const stateVersion = 1

// StateDir keeps the target state of standalone targets (config string, mask
// list, reservations), one file per target named e<shelf>.<slot>.state, so
// that it survives a restart as the protocol expects. It implements
// aoe.StateStore.
//
// A file is replaced atomically: the new state is written to a temporary
// file in the same directory, fsynced, renamed over the old file and the
// directory fsynced, so a crash leaves either the old or the new state,
// never a mix. Several vblade processes (one per target, as with the C
// vblade) may share a directory; they never write the same file.
type StateDir struct {
	dir string
	// mu serialises Commits in this process so that the last Commit to
	// return is the state on disk.
	mu sync.Mutex
}

var _ aoe.StateStore = (*StateDir)(nil)

// stateFile is the on-disk form (JSON). Checksum is the CRC-32C of the
// compact JSON encoding of the record with Checksum empty: JSON alone would
// accept a file that a bad sector or a stray edit altered into other valid
// JSON, and a wrong mask list silently opens a target to other hosts.
type stateFile struct {
	Version      int      `json:"version"`
	Target       string   `json:"target"`
	Config       []byte   `json:"config"` // base64, the config string may hold any bytes
	Masks        []string `json:"masks"`
	Reservations []string `json:"reservations"`
	Checksum     string   `json:"crc32c"`
}

// OpenStateDir returns the state directory dir, creating it (mode 0700, with
// parents) if it is missing.
func OpenStateDir(dir string) (*StateDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w", dir, unwrapPath(err))
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, unwrapPath(err))
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("state directory %s is not a directory", dir)
	}
	return &StateDir{dir: dir}, nil
}

// Dir returns the directory path.
func (d *StateDir) Dir() string { return d.dir }

func targetName(shelf uint16, slot uint8) string { return fmt.Sprintf("e%d.%d", shelf, slot) }

func (d *StateDir) path(shelf uint16, slot uint8) string {
	return filepath.Join(d.dir, targetName(shelf, slot)+".state")
}

// Load returns the saved state of target shelf.slot. ok is false (and err
// nil) when nothing was saved. A file that is not a valid state file is an
// error naming the file, never silently an empty state.
func (d *StateDir) Load(shelf uint16, slot uint8) (s aoe.TargetState, ok bool, err error) {
	path := d.path(shelf, slot)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, false, nil
	}
	if err != nil {
		return s, false, fmt.Errorf("read state file %s: %w", path, unwrapPath(err))
	}
	s, err = decodeState(data, targetName(shelf, slot))
	if err != nil {
		return aoe.TargetState{}, false, fmt.Errorf("state file %s is corrupt: %w; restore it or remove it to start %s with an empty config string, mask list and reservation list",
			path, err, targetName(shelf, slot))
	}
	return s, true, nil
}

// Commit durably replaces the saved state of target shelf.slot with s.
func (d *StateDir) Commit(ctx context.Context, shelf uint16, slot uint8, s aoe.TargetState) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("save state of %s: %w", targetName(shelf, slot), err)
	}
	data, err := encodeState(s, targetName(shelf, slot))
	if err != nil {
		return fmt.Errorf("save state of %s: %w", targetName(shelf, slot), err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return writeAtomic(d.path(shelf, slot), data)
}

func stateChecksum(rec stateFile) (string, error) {
	rec.Checksum = ""
	b, err := json.Marshal(rec)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%08x", crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli))), nil
}

func encodeState(s aoe.TargetState, target string) ([]byte, error) {
	if len(s.Config) > aoe.MaxConfigLen {
		return nil, fmt.Errorf("config string of %d bytes exceeds %d", len(s.Config), aoe.MaxConfigLen)
	}
	if len(s.Masks) > aoe.MaxMasks {
		return nil, fmt.Errorf("%d masks exceed %d", len(s.Masks), aoe.MaxMasks)
	}
	if len(s.Reservations) > aoe.MaxReservations {
		return nil, fmt.Errorf("%d reservations exceed %d", len(s.Reservations), aoe.MaxReservations)
	}
	rec := stateFile{
		Version:      stateVersion,
		Target:       target,
		Config:       s.Config,
		Masks:        macStrings(s.Masks),
		Reservations: macStrings(s.Reservations),
	}
	sum, err := stateChecksum(rec)
	if err != nil {
		return nil, err
	}
	rec.Checksum = sum
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func decodeState(data []byte, target string) (aoe.TargetState, error) {
	var s aoe.TargetState
	if len(bytes.TrimSpace(data)) == 0 {
		return s, errors.New("file is empty")
	}
	var rec stateFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return s, fmt.Errorf("not valid JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return s, errors.New("trailing data after the JSON object")
	}
	if rec.Version != stateVersion {
		return s, fmt.Errorf("format version %d, this program reads version %d", rec.Version, stateVersion)
	}
	sum, err := stateChecksum(rec)
	if err != nil {
		return s, err
	}
	if rec.Checksum != sum {
		return s, fmt.Errorf("checksum mismatch (file says %q, contents give %q)", rec.Checksum, sum)
	}
	if rec.Target != target {
		return s, fmt.Errorf("it holds the state of %q, not %s", rec.Target, target)
	}
	if len(rec.Config) > aoe.MaxConfigLen {
		return s, fmt.Errorf("config string of %d bytes exceeds %d", len(rec.Config), aoe.MaxConfigLen)
	}
	if len(rec.Masks) > aoe.MaxMasks {
		return s, fmt.Errorf("%d masks exceed %d", len(rec.Masks), aoe.MaxMasks)
	}
	if len(rec.Reservations) > aoe.MaxReservations {
		return s, fmt.Errorf("%d reservations exceed %d", len(rec.Reservations), aoe.MaxReservations)
	}
	if s.Masks, err = parseMACs(rec.Masks, "mask"); err != nil {
		return s, err
	}
	if s.Reservations, err = parseMACs(rec.Reservations, "reservation"); err != nil {
		return s, err
	}
	if len(rec.Config) > 0 {
		s.Config = rec.Config
	}
	return s, nil
}

func macStrings(ms []aoe.MAC) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.String()
	}
	return out
}

func parseMACs(ss []string, what string) ([]aoe.MAC, error) {
	if len(ss) == 0 {
		return nil, nil
	}
	out := make([]aoe.MAC, len(ss))
	for i, s := range ss {
		m, err := aoe.ParseMAC(s)
		if err != nil {
			return nil, fmt.Errorf("%s %d: %w", what, i, err)
		}
		out[i] = m
	}
	return out, nil
}

// writeAtomic replaces path with data: temp file, fsync, rename, fsync dir.
func writeAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("save state %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return fmt.Errorf("save state %s: write %s: %w", path, tmp.Name(), unwrapPath(err))
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("save state %s: fsync %s: %w", path, tmp.Name(), unwrapPath(err))
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("save state %s: close %s: %w", path, tmp.Name(), unwrapPath(err))
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("save state %s: %w", path, err)
	}
	// The rename is durable only once the directory entry is.
	df, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("save state %s: open directory: %w", path, unwrapPath(err))
	}
	defer df.Close()
	if err = df.Sync(); err != nil {
		return fmt.Errorf("save state %s: fsync directory %s: %w", path, dir, unwrapPath(err))
	}
	return nil
}
