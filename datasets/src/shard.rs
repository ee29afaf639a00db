//! Shards: the unit of reading, of work assignment and of exactly-once commits.
//!
//! A parquet file or a WebDataset tar is one shard. A plain folder tree is cut into shards of
//! at most `folder_shard_size` images per directory, in sorted order. Shard ids are paths
//! relative to the source URL, so they are the same from every machine.

use crate::{DatasetError, Result, SourceLocation};
use futures::TryStreamExt;
use object_store::{path::Path, ObjectMeta};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Image file extensions recognised in folders and WebDataset members.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// The layout of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardFormat {
    /// img2dataset-style parquet: a binary image column and a key column.
    Parquet,
    /// WebDataset `.tar` shards: members grouped by key.
    WebDataset,
    /// A plain folder tree of image files.
    Folder,
}

impl fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardFormat::Parquet => "parquet",
            ShardFormat::WebDataset => "webdataset",
            ShardFormat::Folder => "folder",
        })
    }
}

/// A shard's id: its path relative to the source URL (folders: `dir/@00003`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(String);

impl ShardId {
    /// Wraps an id string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One shard of a source.
#[derive(Clone, Debug)]
pub struct Shard {
    /// Stable id.
    pub id: ShardId,
    /// Layout of the objects.
    pub format: ShardFormat,
    /// The objects: one parquet or tar file, or the image files of a folder shard.
    pub objects: Vec<ObjectMeta>,
}

fn extension(path: &Path) -> Option<String> {
    path.filename()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase())
}

fn relative(loc: &SourceLocation, path: &Path) -> String {
    path.as_ref()
        .strip_prefix(loc.prefix.as_ref())
        .unwrap_or(path.as_ref())
        .trim_start_matches('/')
        .to_string()
}

/// Lists the shards under `loc`, sorted by id.
pub async fn list_shards(
    loc: &SourceLocation,
    format: ShardFormat,
    folder_shard_size: usize,
) -> Result<Vec<Shard>> {
    let prefix = (!loc.prefix.as_ref().is_empty()).then_some(&loc.prefix);
    let mut objects: Vec<ObjectMeta> = loc
        .store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|e| DatasetError::from_store(&loc.url, e))?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let wanted = |m: &ObjectMeta| match (format, extension(&m.location)) {
        (ShardFormat::Parquet, Some(e)) => e == "parquet",
        (ShardFormat::WebDataset, Some(e)) => e == "tar",
        (ShardFormat::Folder, Some(e)) => IMAGE_EXTENSIONS.contains(&e.as_str()),
        (_, None) => false,
    };
    let objects: Vec<ObjectMeta> = objects.into_iter().filter(wanted).collect();
    let shards: Vec<Shard> = match format {
        ShardFormat::Parquet | ShardFormat::WebDataset => objects
            .into_iter()
            .map(|m| Shard {
                id: ShardId(relative(loc, &m.location)),
                format,
                objects: vec![m],
            })
            .collect(),
        ShardFormat::Folder => {
            let mut by_dir: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
            for m in objects {
                let rel = relative(loc, &m.location);
                let dir = rel.rsplit_once('/').map(|(d, _)| d.to_string());
                by_dir.entry(dir.unwrap_or_default()).or_default().push(m);
            }
            by_dir
                .into_iter()
                .flat_map(|(dir, files)| {
                    files
                        .chunks(folder_shard_size.max(1))
                        .enumerate()
                        .map(|(i, chunk)| Shard {
                            id: ShardId(if dir.is_empty() {
                                format!("@{i:05}")
                            } else {
                                format!("{dir}/@{i:05}")
                            }),
                            format,
                            objects: chunk.to_vec(),
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    };
    if shards.is_empty() {
        return Err(DatasetError::NoShards {
            url: loc.url.clone(),
            format: format.to_string(),
        });
    }
    Ok(shards)
}

/// The shards worker `index` of `count` processes: round-robin over shards sorted by id, so
/// every worker computes the same split from the same listing and the split is balanced.
pub fn assign_shards(mut shards: Vec<Shard>, index: usize, count: usize) -> Result<Vec<Shard>> {
    if count == 0 || index >= count {
        return Err(DatasetError::InvalidWorker { index, count });
    }
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(shards
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % count == index)
        .map(|(_, s)| s)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str) -> Shard {
        Shard {
            id: ShardId::new(id),
            format: ShardFormat::Parquet,
            objects: vec![],
        }
    }

    #[test]
    fn workers_partition_the_shards() {
        let all: Vec<Shard> = (0..23).map(|i| shard(&format!("s{i:03}"))).collect();
        let mut seen = Vec::new();
        for w in 0..4 {
            let mine = assign_shards(all.clone(), w, 4).unwrap();
            assert!(mine.len() == 5 || mine.len() == 6);
            seen.extend(mine.into_iter().map(|s| s.id));
        }
        seen.sort();
        let expected: Vec<ShardId> = all.into_iter().map(|s| s.id).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn assignment_ignores_listing_order() {
        let a: Vec<Shard> = ["c", "a", "b"].iter().map(|s| shard(s)).collect();
        let b: Vec<Shard> = ["b", "c", "a"].iter().map(|s| shard(s)).collect();
        let ids = |v: Vec<Shard>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(
            ids(assign_shards(a, 1, 2).unwrap()),
            ids(assign_shards(b, 1, 2).unwrap())
        );
    }

    #[test]
    fn bad_worker_is_an_error() {
        assert!(matches!(
            assign_shards(vec![], 2, 2),
            Err(DatasetError::InvalidWorker { index: 2, count: 2 })
        ));
    }
}
