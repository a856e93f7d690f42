//! A bounded cache from pre-tokenized piece to its BPE token ids, one per thread and tokenizer.
//!
//! Per-thread maps need no locks, so threads encoding a batch never contend; each map stops
//! accepting entries once full, and a thread keeps maps for only a few tokenizers, so memory
//! stays bounded whatever the input.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

/// Entries one thread keeps for one tokenizer.
const ENTRIES_PER_THREAD: usize = 1 << 16;
/// Tokenizers whose caches one thread keeps (least recently used dropped first).
const TOKENIZERS_PER_THREAD: usize = 4;

/// Pieces longer than this many bytes are not cached (they are rare and expensive to key).
pub(crate) const MAX_CACHED_PIECE: usize = 48;

type Map = FxHashMap<Box<[u8]>, Box<[u32]>>;

thread_local! {
    static CACHES: RefCell<Vec<(u64, Map)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A handle naming one tokenizer's cache; each tokenizer (and each clone) gets its own.
pub(crate) struct PieceCache {
    id: u64,
}

impl PieceCache {
    pub(crate) fn new() -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn with_map<R>(&self, f: impl FnOnce(&mut Map) -> R) -> Option<R> {
        CACHES
            .try_with(|caches| {
                let mut caches = caches.try_borrow_mut().ok()?;
                let pos = match caches.iter().position(|(id, _)| *id == self.id) {
                    Some(pos) => pos,
                    None => {
                        if caches.len() == TOKENIZERS_PER_THREAD {
                            caches.pop();
                        }
                        caches.insert(0, (self.id, Map::default()));
                        0
                    }
                };
                if pos != 0 {
                    caches[..=pos].rotate_right(1);
                }
                Some(f(&mut caches[0].1))
            })
            .ok()
            .flatten()
    }

    /// Appends the cached ids of `piece` to `out`; false on a miss.
    pub(crate) fn get_into(&self, piece: &[u8], out: &mut Vec<u32>) -> bool {
        self.with_map(|map| match map.get(piece) {
            Some(ids) => {
                out.extend_from_slice(ids);
                true
            }
            None => false,
        })
        .unwrap_or(false)
    }

    /// Remembers the ids of `piece`, unless this thread's map is full.
    pub(crate) fn insert(&self, piece: &[u8], ids: &[u32]) {
        self.with_map(|map| {
            if map.len() < ENTRIES_PER_THREAD {
                map.insert(piece.into(), ids.into());
            }
        });
    }
}
