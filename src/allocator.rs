//! [`Allocator`], the global allocator of the `kiln` binary, the examples and the benches
//! (feature `mimalloc`, on by default; the library crates set none, so programs built on them
//! choose their own).
//!
//! Training allocates and frees thousands of activation and gradient buffers per step. glibc's
//! allocator hands large ones back to the kernel and faults them in again (the `train_step` bench
//! ran 1.2–1.4× faster with mimalloc), and mimalloc with its defaults still returns freed pages
//! to the kernel 10–100 ms after they are freed: a step longer than that finds its buffers gone
//! and the kernel zeroes every page again on first touch (a third of the 6×384 bf16 step in
//! `perf`: `clear_page_erms`). [`Allocator`] is mimalloc that keeps the pages it has (its
//! `purge_delay` option at [`PURGE_DELAY_MS`] = −1, never purge), so one step's buffers serve the
//! next: what PyTorch's caching allocator does too. A process's resident memory therefore stays at
//! its high-water mark; `MIMALLOC_PURGE_DELAY=<ms>` in the environment restores purging. Measured
//! with `perf stat -e page-faults` on the 6×384 bf16 step: 5,050 faults with a 2 s delay, 688
//! with none (mimalloc's default: 10 ms).
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: kiln::Allocator = kiln::Allocator;
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

use mimalloc::MiMalloc;

/// How long freed pages stay with the process before mimalloc returns them to the kernel: −1,
/// never.
pub const PURGE_DELAY_MS: i64 = -1;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc, set up on first use to keep the pages it frees (see the module docs). `MIMALLOC_PURGE_DELAY` in the environment still takes precedence.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

static CONFIGURED: AtomicBool = AtomicBool::new(false);

#[inline]
fn configure() {
    if !CONFIGURED.load(Ordering::Relaxed) {
        CONFIGURED.store(true, Ordering::Relaxed);
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: sets one of mimalloc's options; it allocates nothing.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
        }
    }
}

// SAFETY: every call is forwarded to mimalloc's allocator unchanged.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        configure();
        // SAFETY: forwarded from the caller.
        unsafe { MiMalloc.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        configure();
        // SAFETY: forwarded from the caller.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        configure();
        // SAFETY: forwarded from the caller.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}
