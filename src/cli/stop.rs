//! A clean stop for `kiln train`: the first SIGINT or SIGTERM raises the trainer's stop flag (the
//! step in progress finishes and a checkpoint is written); a second one exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// Exit status after a stop by `signal`, as shells report a process killed by it (128 + number).
fn exit_status(signal: i32) -> i32 {
    128 + signal
}

/// The installed handlers: the stop flag and which signal raised it.
pub struct StopSignals {
    stop: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        for signal in [SIGINT, SIGTERM] {
            // Handlers run in registration order: a second signal finds the flag already up and
            // exits; the first only records itself and raises the flag.
            flag::register_conditional_shutdown(signal, exit_status(signal), Arc::clone(&stop))?;
            flag::register_usize(signal, Arc::clone(&which), signal as usize)?;
            flag::register(signal, Arc::clone(&stop))?;
        }
        Ok(Self { stop, which })
    }

    /// The flag the trainer watches.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// The signal that raised the flag (its name) and the exit status to report for it.
    pub fn received(&self) -> (&'static str, i32) {
        match self.which.load(Ordering::SeqCst) as i32 {
            SIGINT => ("SIGINT", exit_status(SIGINT)),
            _ => ("SIGTERM", exit_status(SIGTERM)),
        }
    }
}

/// `arg` quoted for a POSIX shell when it needs to be.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_quoting() {
        assert_eq!(exit_status(SIGINT), 130);
        assert_eq!(exit_status(SIGTERM), 143);
        assert_eq!(shell_quote("runs/tiny-1"), "runs/tiny-1");
        assert_eq!(shell_quote("my runs/it's"), r"'my runs/it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
