//! Which backends the host-side [`LinearKernel`](crate::LinearKernel)s serve.

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
