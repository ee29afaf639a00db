//! The set of committed shards, kept as runs of numbers so that it stays small.
//!
//! Shard ids are paths such as `part-00042.parquet`, `train/00007.tar` or `dir/@00003`: one
//! family of names that differ only in a number. A set of 50,000 of them written out one by
//! one made the ledger checkpoint grow by about 35 bytes a shard, and a new worker's start-up
//! with it (BENCHMARKS.md, "scale: commits"). Here each id is split at its last run of digits
//! into a family (the text before and after it, and the run's width) and a number, and each
//! family keeps its numbers as inclusive ranges. Workers take shards in listing order, so the
//! committed ones form a few long runs and the set's size follows the gaps, not the shards.
//! An id without digits (or with more than 18, beyond a `u64` at full width) is kept whole.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Ids with the same text around their last run of digits, and the same width of that run.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct Family {
    prefix: String,
    suffix: String,
    width: usize,
}

/// Digits beyond this many are not read as a number (they might not fit a `u64`).
const MAX_DIGITS: usize = 18;

/// Splits `id` at its last run of digits: `(family, number)`, or `None` when it has none
/// that can be read back exactly.
fn split(id: &str) -> Option<(Family, u64)> {
    let bytes = id.as_bytes();
    let end = bytes.iter().rposition(u8::is_ascii_digit)? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let width = end - start;
    if width > MAX_DIGITS {
        return None;
    }
    let number = id[start..end].parse().ok()?;
    Some((
        Family {
            prefix: id[..start].to_string(),
            suffix: id[end..].to_string(),
            width,
        },
        number,
    ))
}

/// A set of shard ids (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardSet {
    /// Per family: the start of each run of numbers → its inclusive end. Runs neither overlap
    /// nor touch.
    runs: HashMap<Family, BTreeMap<u64, u64>>,
    /// Ids kept whole.
    whole: HashSet<String>,
    len: usize,
}

impl ShardSet {
    /// Whether `id` is in the set.
    pub fn contains(&self, id: &str) -> bool {
        match split(id) {
            Some((family, n)) => self
                .runs
                .get(&family)
                .and_then(|runs| runs.range(..=n).next_back())
                .is_some_and(|(_, &end)| n <= end),
            None => self.whole.contains(id),
        }
    }

    /// Adds `id`; whether it was new.
    pub fn insert(&mut self, id: &str) -> bool {
        let added = match split(id) {
            Some((family, n)) => insert_run(self.runs.entry(family).or_default(), n, n) == 1,
            None => self.whole.insert(id.to_string()),
        };
        self.len += usize::from(added);
        added
    }

    /// How many ids the set holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set holds no id.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds every id of `other`.
    pub fn extend(&mut self, other: &ShardSet) {
        for (family, theirs) in &other.runs {
            let ours = self.runs.entry(family.clone()).or_default();
            for (&a, &b) in theirs {
                self.len += to_usize(insert_run(ours, a, b));
            }
        }
        for id in &other.whole {
            self.len += usize::from(self.whole.insert(id.clone()));
        }
    }

    /// How many runs and whole ids it takes to write the set down.
    pub fn pieces(&self) -> usize {
        self.runs.values().map(BTreeMap::len).sum::<usize>() + self.whole.len()
    }

    /// The set in its written form, in a stable order (two writers of one set write the same
    /// bytes).
    pub fn to_written(&self) -> WrittenShards {
        let mut families: Vec<WrittenFamily> = self
            .runs
            .iter()
            .map(|(f, runs)| WrittenFamily {
                prefix: f.prefix.clone(),
                suffix: f.suffix.clone(),
                width: f.width,
                runs: runs.iter().map(|(&a, &b)| [a, b]).collect(),
            })
            .collect();
        families
            .sort_by(|a, b| (&a.prefix, &a.suffix, a.width).cmp(&(&b.prefix, &b.suffix, b.width)));
        let mut whole: Vec<String> = self.whole.iter().cloned().collect();
        whole.sort_unstable();
        WrittenShards { families, whole }
    }

    /// The set a written form describes; an error names what in it is malformed.
    pub fn from_written(w: WrittenShards) -> Result<Self, String> {
        let mut set = ShardSet::default();
        for f in w.families {
            if f.runs.is_empty() {
                continue;
            }
            if f.width == 0 || f.width > MAX_DIGITS {
                return Err(format!(
                    "family `{}…{}` has digit width {}, not 1..={MAX_DIGITS}",
                    f.prefix, f.suffix, f.width
                ));
            }
            let family = Family {
                prefix: f.prefix,
                suffix: f.suffix,
                width: f.width,
            };
            let runs = set.runs.entry(family.clone()).or_default();
            let mut last_end: Option<u64> = None;
            for [a, b] in f.runs {
                if b >= 10u64.pow(family.width as u32) {
                    return Err(format!(
                        "family `{}…{}`: run {a}..={b} has numbers wider than {} digits",
                        family.prefix, family.suffix, family.width
                    ));
                }
                if a > b || last_end.is_some_and(|e| a <= e.saturating_add(1)) {
                    return Err(format!(
                        "family `{}…{}`: run {a}..={b} is empty, out of order or touches the \
                         one before it",
                        family.prefix, family.suffix
                    ));
                }
                set.len += to_usize(insert_run(runs, a, b));
                last_end = Some(b);
            }
        }
        for id in w.whole {
            set.insert(&id);
        }
        Ok(set)
    }
}

/// Adds the numbers `a..=b` to `runs`, merging the runs they overlap or touch; how many of
/// them were new.
fn insert_run(runs: &mut BTreeMap<u64, u64>, a: u64, b: u64) -> u64 {
    let (lo, hi) = (a.saturating_sub(1), b.saturating_add(1));
    // Runs start before `hi` at most, and the last one before `lo` may reach into it.
    let first = runs
        .range(..lo)
        .next_back()
        .filter(|(_, &end)| end >= lo)
        .map(|(&start, _)| start);
    let met: Vec<(u64, u64)> = first
        .into_iter()
        .map(|start| (start, runs[&start]))
        .chain(runs.range(lo..=hi).map(|(&s, &e)| (s, e)))
        .collect();
    let covered: u64 = met
        .iter()
        .map(|&(s, e)| {
            let (from, to) = (s.max(a), e.min(b));
            if from <= to {
                to - from + 1
            } else {
                0
            }
        })
        .sum();
    let (mut start, mut end) = (a, b);
    for (s, e) in met {
        runs.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    runs.insert(start, end);
    (b - a + 1) - covered
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A [`ShardSet`] as a checkpoint writes it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WrittenShards {
    families: Vec<WrittenFamily>,
    whole: Vec<String>,
}

/// One family's runs: ids `prefix` + the number at `width` digits + `suffix`, for every
/// number in each inclusive `[first, last]` run.
#[derive(Debug, Serialize, Deserialize)]
struct WrittenFamily {
    prefix: String,
    suffix: String,
    width: usize,
    runs: Vec<[u64; 2]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_split_at_their_last_run_of_digits() {
        let (f, n) = split("train/part-00042.parquet").unwrap();
        assert_eq!(
            (f.prefix.as_str(), f.suffix.as_str(), f.width, n),
            ("train/part-", ".parquet", 5, 42)
        );
        let (f, n) = split("dir2/@00003").unwrap();
        assert_eq!(
            (f.prefix.as_str(), f.suffix.as_str(), f.width, n),
            ("dir2/@", "", 5, 3)
        );
        assert!(split("no-digits.tar").is_none());
        assert!(
            split("x1234567890123456789").is_none(),
            "19 digits are kept whole"
        );
    }

    #[test]
    fn consecutive_shards_take_one_run() {
        let mut set = ShardSet::default();
        // The even numbers from the top down, then again (nothing new), then the odd ones.
        let evens = (0..25_000).rev().map(|i| 2 * i);
        for (i, s) in evens.clone().chain(evens).enumerate() {
            assert_eq!(set.insert(&format!("shard-{s:08}")), i < 25_000);
        }
        assert_eq!((set.len(), set.pieces()), (25_000, 25_000));
        for s in (1..50_000).step_by(2) {
            assert!(set.insert(&format!("shard-{s:08}")));
        }
        assert_eq!((set.len(), set.pieces()), (50_000, 1));
        assert!(set.contains("shard-00049999") && !set.contains("shard-00050000"));
        assert!(
            !set.contains("shard-0049999"),
            "another width is another family"
        );
        let body = serde_json::to_vec(&set.to_written()).unwrap();
        assert!(body.len() < 100, "{}", String::from_utf8_lossy(&body));
    }

    #[test]
    fn malformed_runs_are_refused() {
        let bad = |runs: &str| {
            let json = format!(
                r#"{{"families":[{{"prefix":"p","suffix":"","width":3,"runs":{runs}}}],"whole":[]}}"#
            );
            ShardSet::from_written(serde_json::from_str(&json).unwrap())
        };
        assert!(bad("[[1,3],[5,6]]").is_ok());
        assert!(bad("[[3,1]]").unwrap_err().contains("3..=1"));
        assert!(bad("[[1,3],[4,6]]").unwrap_err().contains("touches"));
        assert!(bad("[[5,6],[1,3]]").is_err());
    }

    proptest! {
        /// Against a plain set of strings: membership, size and the written round trip.
        #[test]
        fn behaves_like_a_set_of_strings(ids in proptest::collection::vec(
            prop_oneof![
                (0u64..40).prop_map(|n| format!("a/{n:03}.tar")),
                (0u64..40).prop_map(|n| format!("a/{n}.tar")),
                (0u64..40).prop_map(|n| format!("b{n:02}")),
                "[a-c]{1,3}",
                Just("x99999999999999999999".to_string()),
            ],
            0..120,
        )) {
            let mut set = ShardSet::default();
            let mut plain = HashSet::new();
            for id in &ids {
                prop_assert_eq!(set.insert(id), plain.insert(id.clone()));
            }
            prop_assert_eq!(set.len(), plain.len());
            for probe in (0u64..45).flat_map(|n| [format!("a/{n:03}.tar"), format!("a/{n}.tar"), format!("b{n:02}")]) {
                prop_assert_eq!(set.contains(&probe), plain.contains(&probe), "{}", probe);
            }
            for id in &plain {
                prop_assert!(set.contains(id));
            }
            let back = ShardSet::from_written(
                serde_json::from_slice(&serde_json::to_vec(&set.to_written()).unwrap()).unwrap(),
            ).unwrap();
            prop_assert_eq!(&back, &set);
            let (half_a, half_b) = ids.split_at(ids.len() / 2);
            let (mut a, mut b) = (ShardSet::default(), ShardSet::default());
            half_a.iter().for_each(|id| { a.insert(id); });
            half_b.iter().for_each(|id| { b.insert(id); });
            a.extend(&b);
            prop_assert_eq!(a, set);
        }
    }
}
