package storage

import "sync"

// rangeLocks makes every ReadAt and WriteAt atomic with respect to the
// others that overlap it. The kernel does not: a pread racing a pwrite of
// the same bytes may return part old, part new data (copy_to_user and
// copy_from_user on a page-cache page are not atomic with each other). A
// disk never returns a sector that no write carried, and neither may we:
// the engine runs many commands at once, and in a cluster the FSM applies
// writes while the leader serves reads. (vblade is single-threaded, so it
// never met this.) The fault suite's linearizability check caught a torn
// read.
//
// The export is cut into stripes of stripeSize bytes mapped onto
// len(rangeLocks) read-write locks; a request takes the locks of the
// stripes it covers in ascending lock order, so two requests never wait for
// each other in a cycle. Uncontended, it costs an atomic operation or two
// per command.
type rangeLocks [256]sync.RWMutex

const stripeShift = 16 // 64 KiB stripes

// span returns the lock indices [lo, hi] a request covers, and whether the
// stripe numbers wrapped past the last lock (then the locks are
// [0, hi] and [lo, last]).
func (r *rangeLocks) span(off int64, n int) (lo, hi int, wrap, all bool) {
	if n <= 0 {
		n = 1
	}
	first := off >> stripeShift
	last := (off + int64(n) - 1) >> stripeShift
	if last-first+1 >= int64(len(r)) {
		return 0, len(r) - 1, false, true
	}
	lo, hi = int(first%int64(len(r))), int(last%int64(len(r)))
	return lo, hi, hi < lo, false
}

func (r *rangeLocks) lock(off int64, n int, write bool)   { r.set(off, n, write, true) }
func (r *rangeLocks) unlock(off int64, n int, write bool) { r.set(off, n, write, false) }

// set takes (lock) or releases the locks of the request's stripes, in
// ascending lock order. A request covering every lock gets [0, last] from
// span, like any unwrapped one.
func (r *rangeLocks) set(off int64, n int, write, lock bool) {
	lo, hi, wrap, _ := r.span(off, n)
	if wrap {
		r.each(0, hi, write, lock)
		r.each(lo, len(r)-1, write, lock)
		return
	}
	r.each(lo, hi, write, lock)
}

func (r *rangeLocks) each(from, to int, write, lock bool) {
	for i := from; i <= to; i++ {
		switch {
		case write && lock:
			r[i].Lock()
		case write:
			r[i].Unlock()
		case lock:
			r[i].RLock()
		default:
			r[i].RUnlock()
		}
	}
}
