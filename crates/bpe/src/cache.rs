//! A bounded, thread-safe cache from pre-tokenized piece to its BPE token ids.

use std::hash::BuildHasher;
use std::sync::Mutex;

use rustc_hash::{FxBuildHasher, FxHashMap};

const SHARDS: usize = 16;
const ENTRIES_PER_SHARD: usize = 8192;

/// Pieces longer than this many bytes are not cached (they are rare and expensive to key).
pub(crate) const MAX_CACHED_PIECE: usize = 48;

type Shard = Mutex<FxHashMap<Box<[u8]>, Box<[u32]>>>;

/// Sharded so that threads encoding a batch rarely wait on one another; each shard stops
/// accepting entries once full, so memory stays bounded whatever the input.
pub(crate) struct PieceCache {
    shards: Box<[Shard]>,
}

impl PieceCache {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FxHashMap::default()))
                .collect(),
        }
    }

    fn shard(&self, piece: &[u8]) -> &Shard {
        &self.shards[(FxBuildHasher.hash_one(piece) >> 60) as usize % SHARDS]
    }

    /// Appends the cached ids of `piece` to `out`; false on a miss.
    pub(crate) fn get_into(&self, piece: &[u8], out: &mut Vec<u32>) -> bool {
        let Ok(map) = self.shard(piece).lock() else {
            return false;
        };
        match map.get(piece) {
            Some(ids) => {
                out.extend_from_slice(ids);
                true
            }
            None => false,
        }
    }

    /// Remembers the ids of `piece`, unless its shard is full.
    pub(crate) fn insert(&self, piece: &[u8], ids: &[u32]) {
        if let Ok(mut map) = self.shard(piece).lock()
            && map.len() < ENTRIES_PER_SHARD
        {
            map.insert(piece.into(), ids.into());
        }
    }
}
