//! The allocator control other modules need: handing freed memory back to the system after a large,
//! short-lived peak (loading a big local config).
//!
//! Input: none. Output: [`release_freed`]. jemalloc (the binary's allocator, and `malloc` itself for every
//! other caller: it is linked unprefixed) keeps freed pages for reuse and returns them after its decay
//! time (5 s, from a background thread). A load whose transient peak is several times what it keeps would
//! otherwise show that peak in the resident size until then.

/// Returns every arena's unused dirty pages to the system now (`arena.<all>.purge`).
pub fn release_freed() {
    // SAFETY: `arena.4096.purge` (4096 = MALLCTL_ARENAS_ALL) takes no input and gives no output: every
    // pointer is null and the length 0, as jemalloc requires of such controls.
    #[allow(unsafe_code)]
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc could not purge its arenas");
    }
}
