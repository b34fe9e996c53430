package storage

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeSync is a sync function the test releases one call at a time.
type fakeSync struct {
	calls   atomic.Int32
	release chan error
}

func (s *fakeSync) sync() error {
	s.calls.Add(1)
	return <-s.release
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func (g *syncGroup) followers() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

// TestSyncGroupSharing: writers that arrive while a sync runs are not
// covered by it (their write may have completed after it started); they all
// share the next one.
func TestSyncGroupSharing(t *testing.T) {
	fs := &fakeSync{release: make(chan error)}
	g := &syncGroup{sync: fs.sync}

	leader := make(chan error, 1)
	go func() { leader <- g.wait() }()
	waitFor(t, "first sync to start", func() bool { return fs.calls.Load() == 1 })

	const n = 10
	var returned atomic.Int32
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := g.wait(); err != nil {
				t.Error(err)
			}
			returned.Add(1)
		}()
	}
	waitFor(t, "followers to wait", func() bool { return g.followers() == n })

	fs.release <- nil // sync 1 completes
	if err := <-leader; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "second sync to start", func() bool { return fs.calls.Load() == 2 })
	if r := returned.Load(); r != 0 {
		t.Fatalf("%d writers returned on a sync that started before they called", r)
	}
	fs.release <- nil // sync 2 covers all ten
	wg.Wait()
	if c := fs.calls.Load(); c != 2 {
		t.Fatalf("%d syncs, want 2 (1 for the leader, 1 shared by %d followers)", c, n)
	}

	// Idle group: a lone waiter runs its own sync at once.
	go func() { fs.release <- nil }()
	if err := g.wait(); err != nil || fs.calls.Load() != 3 {
		t.Fatalf("lone wait: err %v, calls %d", err, fs.calls.Load())
	}
}

// TestSyncGroupStickyFailure: a failed sync fails its waiters and every
// later one, even if a later fdatasync would report success.
func TestSyncGroupStickyFailure(t *testing.T) {
	eio := errors.New("EIO")
	fs := &fakeSync{release: make(chan error, 3)}
	g := &syncGroup{sync: fs.sync}

	fs.release <- nil
	if err := g.wait(); err != nil {
		t.Fatal(err)
	}
	fs.release <- eio
	if err := g.wait(); !errors.Is(err, eio) {
		t.Fatalf("wait on failing sync: %v", err)
	}
	fs.release <- nil
	if err := g.wait(); !errors.Is(err, eio) {
		t.Fatalf("wait after a failed sync: %v, want the sticky failure", err)
	}
}
