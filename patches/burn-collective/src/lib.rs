mod global;
pub use global::*;

mod config;
pub use config::*;

mod api;
pub use api::*;

mod local;

// Kiln patch: the crate's own tests (src/tests/) are not part of this copy.
