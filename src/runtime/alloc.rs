//! glibc allocator settings for large request bodies.

/// Keeps large request bodies' memory in the process. glibc's defaults hand a freed block at
/// the top of the heap back to the kernel once it exceeds twice the largest body seen, then
/// fault it back in, page by page, for the next one: a 400 KB prompt cost ~100 page faults
/// per request. Freed memory up to the trim threshold stays mapped for reuse instead.
/// Call it first in `main`, before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // The one `unsafe` of the crate: mallopt is a C call with no memory-safety contract of its
    // own beyond "before threads allocate", which `main` guarantees by calling it first.
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}
