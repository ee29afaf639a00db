//! One record read from a shard, before decoding.

use crate::{RejectReason, ShardId};
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A record as read from its shard: identity plus the encoded image, or why there is none.
#[derive(Clone, Debug)]
pub struct RawRecord {
    /// Stable id: [`record_id`] of shard and key.
    pub id: u64,
    /// The record's key within its shard (parquet key column, WebDataset key, file path).
    pub key: String,
    /// The shard it came from.
    pub shard: ShardId,
    /// Encoded image bytes, or the reason the container held no usable image.
    pub payload: Result<Bytes, RejectReason>,
    /// The configured text columns ([`crate::ReaderOptions::text_columns`]), in order; `None`
    /// where the record's cell is null or its member absent.
    pub text: Vec<Option<String>>,
}

impl RawRecord {
    /// The record `key` of `shard`, its id made by [`record_id`].
    pub fn new(
        shard: &ShardId,
        key: String,
        payload: Result<Bytes, RejectReason>,
        text: Vec<Option<String>>,
    ) -> Self {
        Self {
            id: record_id(shard, &key),
            key,
            shard: shard.clone(),
            payload,
            text,
        }
    }
}

/// A stable 63-bit id for the record `key` of `shard`: the first 8 bytes of
/// SHA-256(shard "\n" key) with the top bit cleared, so it is also a valid i64 for readers
/// (pandas, SQL) that have no u64. Re-reading the same source always gives the same ids.
pub fn record_id(shard: &ShardId, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(shard.as_str().as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) & (u64::MAX >> 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = ShardId::new("part-0.parquet");
        let b = ShardId::new("part-1.parquet");
        assert_eq!(record_id(&a, "k1"), record_id(&a, "k1"));
        assert_ne!(record_id(&a, "k1"), record_id(&a, "k2"));
        assert_ne!(record_id(&a, "k1"), record_id(&b, "k1"));
        assert!(record_id(&a, "k1") <= i64::MAX as u64);
        // Pinned: ids must never change between releases, or resumed tables get duplicates.
        // Value from Python: sha256(b"part-0.parquet\nk1")[:8] as big-endian, top bit cleared.
        assert_eq!(record_id(&a, "k1"), 0x2590_f7ff_eefc_36bd);
    }
}
