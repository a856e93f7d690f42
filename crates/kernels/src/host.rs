//! Which backends the host-side [`LinearKernel`](crate::LinearKernel)s serve.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::backend::Backend;

/// Whether a model on backend `B` should multiply through the host-side kernels attached to its
/// layers: Flex (Burn's CPU backend, whose tensors are host memory) without autodiff, as the
/// kernels have no backward pass. Other backends (GPUs, training) multiply by the weights in the
/// backend's own float type.
pub fn runs_host_kernels<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    {
        std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn_flex::Flex>()
    }
    #[cfg(not(feature = "flex"))]
    {
        false
    }
}

/// Runs `f` on a worker of rayon's global pool, which the host kernels split their work over, and
/// returns its result; in place when already on one. Parallel loops inside `f` then share the work
/// with the thread that started them, where a caller outside the pool would sleep while every
/// worker is woken: with many small products in a row (a decoding step), fewer wake-ups.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `scope` runs its body on a worker of the global pool and blocks this thread until it ends.
    rayon::scope(|_| f())
}

/// [`on_worker`], with the pool's other workers polling for work until `f` returns instead of
/// going to sleep between two parallel loops and being woken for the next: a decoding step runs
/// ~150 short products in a row, and each wake-up is a trip through the OS scheduler. A polling
/// worker offers its core to other runnable threads between polls (`sched_yield`), but still
/// keeps every core of the pool busy while `f` runs, as llama.cpp's thread pool does between
/// operations: on a machine shared with other work it can cost more than it saves.
/// `KILN_POLLING_WORKERS=0` turns this off (plain [`on_worker`]).
pub fn on_polling_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("KILN_POLLING_WORKERS").map_or(true, |v| v != "0"));
    if !enabled || rayon::current_thread_index().is_some() {
        return on_worker(f);
    }
    let done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| {
                // The thread running `f` may pick this task up while it waits inside `f`; polling
                // there would keep `f` from ever finishing.
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Set when `f` returns or unwinds, so that the polling workers always stop.
        let _stop = StopOnDrop(done);
        f()
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// This machine's CPU for benchmark reports: the model name (`/proc/cpuinfo`), or `"unknown CPU"`,
/// followed by the instruction sets Kiln's kernels choose between that it has (`avx512_bf16`,
/// `avx512_vnni`, `avx512f`, `avx2`).
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    #[cfg(target_arch = "x86_64")]
    {
        let sets = [
            (
                "avx512_bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
            (
                "avx512_vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ];
        let has: Vec<&str> = sets.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        if !has.is_empty() {
            return format!("{model} ({})", has.join(", "));
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::on_polling_workers;

    /// Parallel loops inside `f` finish with the right results, and the polling workers stop when
    /// `f` returns (or the call would never return), also when called again right after; on a
    /// worker already (inside another parallel loop), `f` just runs.
    #[test]
    fn polling_workers_share_the_work_and_stop() {
        for _ in 0..20 {
            let sums: Vec<u64> = on_polling_workers(|| {
                (0..50u64)
                    .map(|n| (0..=n * 1000).into_par_iter().sum())
                    .collect()
            });
            for (n, sum) in (0u64..).zip(&sums) {
                let n = n * 1000;
                assert_eq!(*sum, n * (n + 1) / 2);
            }
        }
        let nested: Vec<usize> = (0..4usize)
            .into_par_iter()
            .map(|i| on_polling_workers(|| (0..=i).into_par_iter().sum()))
            .collect();
        assert_eq!(nested, [0, 1, 3, 6]);
        // A panic inside `f` reaches the caller (the polling workers stop instead of spinning on).
        let caught = std::panic::catch_unwind(|| {
            on_polling_workers(|| {
                let sum: u64 = (0..1000u64).into_par_iter().sum();
                assert_eq!(sum, 0, "deliberate");
            })
        });
        assert!(caught.is_err());
    }
}
