//! The held-out split: a record is held out when a hash of its key falls below a fraction.
//!
//! The hash is of the key's *stem*: the key with its folders and its extension removed and
//! lower-cased (`img/twitter/64/1F600.png` → `1f600`). So the same name in two sets (one
//! emoji drawn by Twitter, OpenMoji and Noto, all keyed by code point) falls on the same
//! side, and a held-out concept is unseen by every model trained on the other side. The
//! split depends on the key, the fraction and a salt only: it needs no table, no state and
//! no coordination between workers, and never moves when rows are added.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which records are held out (`[split]` and `train_clip.split`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Fraction of keys held out, in [0, 1).
    #[serde(default = "default_fraction")]
    pub holdout_fraction: f64,
    /// Mixed into the hash: another salt gives another, independent split.
    #[serde(default = "default_salt")]
    pub salt: String,
}

fn default_fraction() -> f64 {
    0.05
}
fn default_salt() -> String {
    "eval".into()
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            holdout_fraction: default_fraction(),
            salt: default_salt(),
        }
    }
}

/// The part of a key the split hashes: no folders, no extension, lower case.
pub fn key_stem(key: &str) -> String {
    let name = key.rsplit(['/', '\\']).next().unwrap_or(key);
    let stem = match name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => name,
    };
    stem.to_lowercase()
}

/// A held-out fraction outside [0, 1): the one way [`SplitConfig::validate`] fails. Callers
/// report it under their own config key.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("holdout_fraction = {0} must be in [0, 1) (0.05 holds out 5 % of keys)")]
pub struct HoldoutFractionOutOfRange(pub f64);

impl SplitConfig {
    /// Checks the fraction.
    pub fn validate(&self) -> Result<(), HoldoutFractionOutOfRange> {
        if !(0.0..1.0).contains(&self.holdout_fraction) {
            return Err(HoldoutFractionOutOfRange(self.holdout_fraction));
        }
        Ok(())
    }

    /// The key's position in [0, 1): SHA-256 of salt and stem, as a fraction.
    pub fn position(&self, key: &str) -> f64 {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        h.update(b"\n");
        h.update(key_stem(key).as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether the record with `key` is held out.
    pub fn is_holdout(&self, key: &str) -> bool {
        self.position(key) < self.holdout_fraction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_ignore_folders_extensions_and_case() {
        assert_eq!(key_stem("img/twitter/64/1F600.png"), "1f600");
        assert_eq!(key_stem("1f600"), "1f600");
        assert_eq!(key_stem("a/b/.hidden"), ".hidden");
        assert_eq!(key_stem("0023-fe0f-20e3.webp"), "0023-fe0f-20e3");
        let s = SplitConfig::default();
        assert_eq!(s.is_holdout("x/1F600.png"), s.is_holdout("1f600"));
    }

    #[test]
    fn the_fraction_is_held_out_and_salts_are_independent() {
        let a = SplitConfig {
            holdout_fraction: 0.1,
            salt: "a".into(),
        };
        let b = SplitConfig {
            salt: "b".into(),
            ..a.clone()
        };
        let keys: Vec<String> = (0..20_000).map(|i| format!("key-{i}")).collect();
        let in_a = keys.iter().filter(|k| a.is_holdout(k)).count();
        let in_both = keys
            .iter()
            .filter(|k| a.is_holdout(k) && b.is_holdout(k))
            .count();
        assert!((1_800..2_200).contains(&in_a), "{in_a}");
        // Independent splits overlap by about 1 % (0.1 x 0.1).
        assert!((120..290).contains(&in_both), "{in_both}");
        // Pinned: the split of a key never changes between releases. Value from Python:
        // int.from_bytes(sha256(b"eval\n1f600").digest()[:8], "big") >> 11 / 2**53.
        let p = SplitConfig::default().position("1F600.png");
        assert!((p - PINNED_1F600).abs() < 1e-15, "{p}");
    }

    const PINNED_1F600: f64 = 0.107_652_400_929_220_9;
}
