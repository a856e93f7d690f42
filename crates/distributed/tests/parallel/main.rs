//! Distributed training on ranks that are threads of this process: data parallelism and ZeRO
//! ([`data_parallel`], [`zero3_gather`]) and tensor and pipeline parallelism ([`model_parallel`]),
//! each against the single-device run. One test binary, so that they link once.

use std::sync::Mutex;

mod data_parallel;
mod model_parallel;
mod zero3_gather;

/// Burn's CPU random generator and its collective server are process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());
