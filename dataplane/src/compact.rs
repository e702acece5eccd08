//! Giving back memory the agent no longer needs.
//!
//! A B-tree filled in key order (a listing, a bulk apply, the reconciler
//! programming Services by name) leaves its nodes a little over half full:
//! a full node splits into a half that never grows again and one that
//! takes the next keys. Built in one go from sorted entries, its nodes are
//! full. [`rebuilt`] does that; the agent calls it after its start-up and
//! after many changes, then [`release_free_memory`] hands the freed pages
//! back to the kernel. [`drop_resident_pages`] does the same for data of
//! the executable read once.

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

/// Takes the pages of `bytes`, read-only data of the executable, out of
/// the process's RSS. For the embedded BPF object (2.7 MB, parsed once at
/// start-up, its debug info included): its pages stay resident after the
/// programs are loaded, though nothing reads them again. They are the
/// file's pages, never written, so the kernel reads them back from the
/// file should anything touch them again. Only pages wholly inside `bytes`
/// are dropped.
pub fn drop_resident_pages(bytes: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let Ok(page) = usize::try_from(page) else {
        return;
    };
    if page == 0 {
        return;
    }
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end <= start {
        return;
    }
    // SAFETY: the range lies inside an immutable static (read-only pages
    // mapped from the executable, never written); MADV_DONTNEED only
    // drops them from the page tables, and a later read faults them in
    // again with the same content.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_DONTNEED) of {} bytes: {}",
            end - start,
            std::io::Error::last_os_error()
        );
    }
}
