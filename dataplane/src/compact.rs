//! Giving back memory the agent's trees no longer need.
//!
//! A B-tree filled in key order (a listing, a bulk apply, the reconciler
//! programming Services by name) leaves its nodes a little over half full:
//! a full node splits into a half that never grows again and one that
//! takes the next keys. Built in one go from sorted entries, its nodes are
//! full. [`rebuilt`] does that; the agent calls it after its start-up and
//! after many changes, then [`release_free_memory`] hands the freed pages
//! back to the kernel.

/// `c` with the same content, built anew (a B-tree with full nodes).
pub fn rebuilt<C>(c: C) -> C
where
    C: IntoIterator + FromIterator<<C as IntoIterator>::Item>,
{
    c.into_iter().collect()
}

/// Returns the allocator's free pages (also those between blocks in use)
/// to the kernel, so they leave the process's RSS.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
