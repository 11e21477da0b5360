//! The process's allocator, and the one request to it that needs `unsafe`.
//!
//! Both processes (the agent and the gateway) allocate a little per request on every
//! worker thread; mimalloc's thread-local heaps cost less per malloc and free than glibc's
//! arenas (a fifth of the agent's CPU under load once went to glibc's malloc).
//!
//! mimalloc gives freed memory back to the system a while after it is freed (its purge
//! delay), but only when a later free comes along to do it. A process that goes idle after
//! a burst (the gateway after building a table of a thousand routes, or after writing a
//! large admin answer) would keep that garbage resident for good. [`release_free_memory`]
//! does it at once; mimalloc's safe API has no such call, hence this crate.

/// The global allocator: `#[global_allocator] static A: Allocator = Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

/// Frees the calling thread's empty pages and gives every page freed so far (by any
/// thread) back to the system now, instead of after mimalloc's purge delay. It walks the
/// calling thread's pages: call it every second or so, or after a burst, not per request.
pub fn release_free_memory() {
    #[allow(unsafe_code)]
    // SAFETY: `mi_collect` takes no pointers and has no preconditions; it works on the
    // calling thread's heap and mimalloc's own arenas, which it synchronises itself. It
    // does nothing harmful when mimalloc is not the global allocator.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_freed_before_a_release_is_still_usable_after_it() {
        let kept: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        let freed: Vec<Vec<u8>> = (0..1000).map(|_| vec![0u8; 4096]).collect();
        drop(freed);
        release_free_memory();
        // The blocks that stayed are intact, and the allocator serves new ones.
        assert!(
            kept.iter()
                .enumerate()
                .all(|(i, v)| v.iter().all(|b| *b == i as u8))
        );
        let fresh = vec![7u8; 1 << 20];
        assert_eq!(fresh.iter().map(|b| u64::from(*b)).sum::<u64>(), 7 << 20);
    }
}
