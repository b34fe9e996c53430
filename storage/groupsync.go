package storage

import "sync"

// syncGroup shares fdatasync calls between concurrent writers (group
// commit). O_SYNC makes every pwrite pay for its own device flush, one after
// another; here a writer that needs durability waits for the next fdatasync
// to start after its write completed, and everyone who arrived while one
// sync was running is covered by the following single sync.
//
// It is a leader/follower scheme without a background goroutine: the first
// waiter that finds no sync running becomes the leader and runs it; the rest
// sleep on the condition variable. Generations are numbered: started is the
// number of the newest sync that has begun, done that of the newest finished.
// Only one sync runs at a time, so done advances one generation at a time and
// a waiter that arrives when started == s is covered exactly by sync s+1.
type syncGroup struct {
	sync func() error // the fdatasync; set once before first use

	mu      sync.Mutex
	cond    sync.Cond // L is &mu, set lazily so the zero value works
	started uint64
	done    uint64
	running bool
	waiting int // followers asleep in cond.Wait (observability, tests)
	// failed is the generation of the first sync that failed (0: none) and
	// failErr its error. Failure is sticky; see the package comment.
	failed  uint64
	failErr error
}

// wait returns once a sync that started after the call has finished, with
// that sync's error (or the earlier sticky failure).
func (g *syncGroup) wait() error {
	g.mu.Lock()
	if g.cond.L == nil {
		g.cond.L = &g.mu
	}
	target := g.started + 1
	for g.done < target {
		if g.running {
			g.waiting++
			g.cond.Wait()
			g.waiting--
			continue
		}
		g.running = true
		g.started++
		gen := g.started
		g.mu.Unlock()
		err := g.sync()
		g.mu.Lock()
		g.running = false
		g.done = gen
		if err != nil && g.failed == 0 {
			g.failed, g.failErr = gen, err
		}
		g.cond.Broadcast()
	}
	var err error
	if g.failed != 0 && target >= g.failed {
		err = g.failErr
	}
	g.mu.Unlock()
	return err
}
