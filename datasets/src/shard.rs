//! Shards: the unit of reading, of work assignment and of exactly-once commits.
//!
//! A parquet file or a WebDataset tar is one shard. A plain folder tree is cut into shards of
//! at most `folder_shard_size` images per directory, in sorted order. Shard ids are paths
//! relative to the source URL, so they are the same from every machine.

use crate::{DatasetError, RejectReason, Result, SourceLocation};
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
    /// Folder entries found by the listing that are not read, each with why (a dangling
    /// symlink, a link out of the source): the reader turns them into counted rejects.
    pub refused: Vec<Refused>,
}

/// A folder entry the listing refuses to read, keyed like the records of its shard.
#[derive(Clone, Debug)]
pub struct Refused {
    /// The entry's path below the source URL.
    pub key: String,
    /// Why it is not read.
    pub reason: RejectReason,
}

/// How a source is listed.
#[derive(Clone, Debug)]
pub struct ListOptions {
    /// Folder sources: images per shard, within one directory.
    pub folder_shard_size: usize,
    /// Local folder sources: read symlinks that lead out of the source (a symlink farm over a
    /// shared pool). Off, such links are refused as `unsafe_path`; links within the source
    /// are read either way, and dangling links are always `not_a_file`.
    pub follow_symlinks: bool,
    /// The config section the source is set in, for messages (`embed.source`).
    pub config_prefix: String,
}

impl Default for ListOptions {
    fn default() -> Self {
        Self {
            folder_shard_size: 1000,
            follow_symlinks: false,
            config_prefix: "embed.source".into(),
        }
    }
}

/// One entry of a listing: an object to read, or one refused at listing.
enum Listed {
    Object(ObjectMeta),
    Refused(Path, RejectReason),
}

impl Listed {
    fn location(&self) -> &Path {
        match self {
            Listed::Object(m) => &m.location,
            Listed::Refused(p, _) => p,
        }
    }
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
    opts: &ListOptions,
) -> Result<Vec<Shard>> {
    let mut listed = match (format, loc.local_dir()) {
        (ShardFormat::Folder, Some(root)) => {
            let (follow, key) = (opts.follow_symlinks, opts.config_prefix.clone());
            let dir = root.clone();
            tokio::task::spawn_blocking(move || walk_local(&dir, follow, &key))
                .await
                .map_err(|e| DatasetError::LocalIo {
                    path: root,
                    source: std::io::Error::other(format!("listing thread failed: {e}")),
                })??
        }
        _ => {
            let prefix = (!loc.prefix.as_ref().is_empty()).then_some(&loc.prefix);
            loc.list_all(prefix)
                .await
                .map_err(|e| DatasetError::from_store(&loc.url, e))?
                .into_iter()
                .map(Listed::Object)
                .collect()
        }
    };
    listed.sort_by(|a, b| a.location().cmp(b.location()));
    let wanted = |l: &Listed| match (format, extension(l.location())) {
        (_, _) if matches!(l, Listed::Refused(..)) => true,
        (ShardFormat::Parquet, Some(e)) => e == "parquet",
        (ShardFormat::WebDataset, Some(e)) => e == "tar",
        (ShardFormat::Folder, Some(e)) => IMAGE_EXTENSIONS.contains(&e.as_str()),
        (_, None) => false,
    };
    let listed: Vec<Listed> = listed.into_iter().filter(wanted).collect();
    let shard_of = |id: String, entries: Vec<Listed>| {
        let mut shard = Shard {
            id: ShardId(id),
            format,
            objects: Vec::new(),
            refused: Vec::new(),
        };
        for entry in entries {
            match entry {
                Listed::Object(m) => shard.objects.push(m),
                Listed::Refused(path, reason) => shard.refused.push(Refused {
                    key: relative(loc, &path),
                    reason,
                }),
            }
        }
        shard
    };
    let shards: Vec<Shard> = match format {
        ShardFormat::Parquet | ShardFormat::WebDataset => listed
            .into_iter()
            .map(|l| shard_of(relative(loc, l.location()), vec![l]))
            .collect(),
        ShardFormat::Folder => {
            let mut by_dir: BTreeMap<String, Vec<Listed>> = BTreeMap::new();
            for l in listed {
                let rel = relative(loc, l.location());
                let dir = rel.rsplit_once('/').map(|(d, _)| d.to_string());
                by_dir.entry(dir.unwrap_or_default()).or_default().push(l);
            }
            let size = opts.folder_shard_size.max(1);
            let mut shards = Vec::new();
            for (dir, files) in by_dir {
                let mut files = files.into_iter().peekable();
                let mut i = 0;
                while files.peek().is_some() {
                    let chunk: Vec<Listed> = files.by_ref().take(size).collect();
                    let id = if dir.is_empty() {
                        format!("@{i:05}")
                    } else {
                        format!("{dir}/@{i:05}")
                    };
                    shards.push(shard_of(id, chunk));
                    i += 1;
                }
            }
            shards
        }
    };
    if shards.is_empty() {
        return Err(DatasetError::NoShards {
            url: loc.url.clone(),
            format: format.to_string(),
            key: opts.config_prefix.clone(),
        });
    }
    Ok(shards)
}

/// Lists a local folder source without following symlinks blindly: a link is read when its
/// target lies inside `root` (or `follow` allows any target), refused when it leads out, and a
/// dangling one is refused too, so every image-named entry is either listed or counted.
/// `config_prefix` names the section whose `follow_symlinks` the refusal points to.
fn walk_local(root: &std::path::Path, follow: bool, config_prefix: &str) -> Result<Vec<Listed>> {
    let io = |path: &std::path::Path, source: std::io::Error| DatasetError::LocalIo {
        path: path.to_path_buf(),
        source,
    };
    let at = |path: &std::path::Path| {
        Path::from_absolute_path(path).map_err(|e| io(path, std::io::Error::other(e)))
    };
    let canonical_root = std::fs::canonicalize(root).map_err(|e| io(root, e))?;
    let mut out = Vec::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(follow)
        .sort_by_file_name();
    for entry in walker {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                // With links followed, a dangling link or a loop surfaces here.
                let Some(path) = e.path().map(|p| p.to_path_buf()) else {
                    return Err(io(root, e.into()));
                };
                if e.io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
                {
                    return Err(io(&path, e.into()));
                }
                let detail = format!("`{}` cannot be read: {e}", path.display());
                out.push(Listed::Refused(
                    at(&path)?,
                    RejectReason::NotAFile { detail },
                ));
                continue;
            }
        };
        let path = entry.path();
        let is_link = entry.path_is_symlink();
        if entry.file_type().is_dir() && !is_link {
            continue;
        }
        let meta = if is_link {
            match std::fs::canonicalize(path) {
                Err(e) => {
                    let target = std::fs::read_link(path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    let detail = format!("symlink to `{target}`, which cannot be opened: {e}");
                    out.push(Listed::Refused(
                        at(path)?,
                        RejectReason::NotAFile { detail },
                    ));
                    continue;
                }
                Ok(target) if !follow && !target.starts_with(&canonical_root) => {
                    let detail = format!(
                        "symlink to `{}`, outside the source; set {config_prefix}.follow_symlinks = true to read links out of it",
                        target.display()
                    );
                    out.push(Listed::Refused(
                        at(path)?,
                        RejectReason::UnsafePath { detail },
                    ));
                    continue;
                }
                Ok(target) => {
                    let meta = std::fs::metadata(&target).map_err(|e| io(&target, e))?;
                    if meta.is_dir() {
                        continue; // inside the source: its files are listed where they are
                    }
                    meta
                }
            }
        } else {
            entry.metadata().map_err(|e| io(path, e.into()))?
        };
        if !meta.is_file() {
            continue;
        }
        out.push(Listed::Object(ObjectMeta {
            location: at(path)?,
            last_modified: meta
                .modified()
                .map(chrono::DateTime::<chrono::Utc>::from)
                .unwrap_or_default(),
            size: meta.len(),
            e_tag: None,
            version: None,
        }));
    }
    Ok(out)
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
            refused: Vec::new(),
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
