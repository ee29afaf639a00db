//! WebDataset shards: a tar whose consecutive members sharing a key (the file name up to its
//! first dot, with its directory) form one sample. The sample's image member (jpg, jpeg, png,
//! webp, gif or bmp, in that preference) is the record; a text column `c` is read from the
//! member with extension `c` (a `caption` also from `txt`, img2dataset's name); other members
//! are ignored.
//!
//! Every sample becomes a record or a counted reject: a member named with `..` or an absolute
//! path (`unsafe_path`), a sample whose only image member is a symlink or device
//! (`not_a_file`), a member name seen twice in a row (`duplicate_key`: the first is kept; a
//! key that comes back after other samples is caught by [`super::UniqueIds`]).
//! The tar is streamed from the store and parsed on a blocking thread; records cross to async
//! code through a bounded channel, so memory holds one sample at a time.

use super::{ReaderOptions, StoreFault};
use crate::shard::IMAGE_EXTENSIONS;
use crate::{DatasetError, RawRecord, RejectReason, Result, Shard, ShardId, SourceLocation};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use std::io::Read;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

pub(super) fn read(
    loc: SourceLocation,
    shard: Shard,
    opts: ReaderOptions,
) -> BoxStream<'static, Result<RawRecord>> {
    let (tx, rx) = mpsc::channel::<Result<RawRecord>>(16);
    tokio::spawn(async move {
        let Some(meta) = shard.objects.first().cloned() else {
            return;
        };
        let url = loc.url_of(&meta.location);
        let body = match loc.store.get_opts(&meta.location, Default::default()).await {
            Ok(r) => r.into_stream(),
            Err(e) => {
                let _ = tx.send(Err(DatasetError::from_store(&url, e))).await;
                return;
            }
        };
        // A read that fails in the middle of the tar is the store's fault, not the tar's.
        let fault = StoreFault::default();
        let kept = fault.clone();
        let body = body.map_err(move |e| std::io::Error::other(kept.keep(&url, e)));
        let reader = SyncIoBridge::new(StreamReader::new(body));
        let shard_id = shard.id.clone();
        let err_tx = tx.clone();
        let joined = tokio::task::spawn_blocking(move || {
            if let Err(e) = parse(reader, &shard_id, &opts, &tx) {
                let _ = tx.blocking_send(Err(fault.explain(e)));
            }
        })
        .await;
        if let Err(e) = joined {
            let _ = err_tx
                .send(Err(DatasetError::CorruptShard {
                    shard: shard.id.to_string(),
                    reason: format!("reader thread failed: {e}"),
                }))
                .await;
        }
    });
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) }).boxed()
}

/// Splits a member path into (key, extension): `a/b/000123.seg.png` → (`a/b/000123`, `seg.png`).
fn split_member(path: &str) -> (String, String) {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
    let key = match dir {
        Some(d) => format!("{d}/{stem}"),
        None => stem.to_string(),
    };
    (key, ext.to_ascii_lowercase())
}

struct Sample {
    key: String,
    members: Vec<String>,
    image: Option<(usize, std::result::Result<Bytes, RejectReason>)>,
    text: Vec<Option<String>>,
    /// Why the whole sample is refused whatever its members hold (an unsafe path).
    refused: Option<RejectReason>,
}

/// Which text column a member with extension `ext` fills, if any.
fn text_slot(opts: &ReaderOptions, ext: &str) -> Option<usize> {
    opts.text_columns
        .iter()
        .position(|c| c.name == ext)
        .or_else(|| {
            (ext == "txt")
                .then(|| opts.text_columns.iter().position(|c| c.name == "caption"))
                .flatten()
        })
}

impl Sample {
    fn new(key: String, opts: &ReaderOptions) -> Self {
        Self {
            key,
            members: Vec::new(),
            image: None,
            text: vec![None; opts.text_columns.len()],
            refused: None,
        }
    }

    fn into_record(self, shard: &ShardId) -> RawRecord {
        let payload = match (self.refused, self.image) {
            (Some(why), _) => Err(why),
            (None, Some((_, p))) => p,
            (None, None) => Err(RejectReason::NoImage {
                detail: format!(
                    "sample has members [{}] but no image",
                    self.members.join(", ")
                ),
            }),
        };
        RawRecord::new(shard, self.key, payload, self.text)
    }
}

/// Why a member name may not be used as a key: it climbs out with `..` or is absolute. Such
/// names are what a hostile tar uses to write outside the extraction directory; here they
/// would only become odd keys, but nobody made a dataset that way on purpose.
fn unsafe_member_path(path: &str) -> Option<String> {
    if path.starts_with('/') || path.starts_with('\\') {
        return Some(format!("tar member `{path}` has an absolute path"));
    }
    path.split(['/', '\\'])
        .any(|part| part == "..")
        .then(|| format!("tar member `{path}` climbs out of the archive with `..`"))
}

/// The parser's position in the archive: the sample being filled and the keys already done.
struct Grouping<'a> {
    shard: &'a ShardId,
    opts: &'a ReaderOptions,
    tx: &'a mpsc::Sender<Result<RawRecord>>,
    current: Option<Sample>,
}

impl<'a> Grouping<'a> {
    /// Sends `record`; false once the consumer has stopped reading.
    fn send(&self, record: RawRecord) -> bool {
        self.tx.blocking_send(Ok(record)).is_ok()
    }

    /// The sample for `key`, sending the previous one if `key` starts a new sample.
    fn sample_for(&mut self, key: &str) -> Option<&mut Sample> {
        if self.current.as_ref().is_some_and(|s| s.key != key) {
            let done = self.current.take().expect("checked above");
            if !self.send(done.into_record(self.shard)) {
                return None;
            }
        }
        if self.current.is_none() {
            self.current = Some(Sample::new(key.to_string(), self.opts));
        }
        self.current.as_mut()
    }

    fn finish(mut self) {
        if let Some(last) = self.current.take() {
            let _ = self.send(last.into_record(self.shard));
        }
    }
}

fn parse(
    reader: impl Read,
    shard: &ShardId,
    opts: &ReaderOptions,
    tx: &mpsc::Sender<Result<RawRecord>>,
) -> Result<()> {
    let corrupt = |reason: String| DatasetError::CorruptShard {
        shard: shard.to_string(),
        reason,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| corrupt(format!("not a tar archive: {e}")))?;
    let mut grouping = Grouping {
        shard,
        opts,
        tx,
        current: None,
    };
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(format!("bad tar member: {e}")))?;
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if path.ends_with('/') {
            continue; // a directory in old tar's way
        }
        let (key, ext) = split_member(&path);
        let unsafe_path = unsafe_member_path(&path);
        let Some(sample) = grouping.sample_for(&key) else {
            return Ok(()); // the consumer stopped reading
        };
        if let Some(detail) = unsafe_path {
            sample
                .refused
                .get_or_insert(RejectReason::UnsafePath { detail });
        }
        if sample.members.contains(&ext) {
            // The same member name twice in a row: the first is the sample's, this one is
            // counted on its own.
            let dup = RawRecord::new(
                shard,
                key.clone(),
                Err(RejectReason::DuplicateKey {
                    detail: format!("member `{path}` appears twice in the tar; the first is kept"),
                }),
                vec![None; opts.text_columns.len()],
            );
            if !grouping.send(dup) {
                return Ok(());
            }
            continue;
        }
        sample.members.push(ext.clone());
        if !kind.is_file() {
            // A symlink, hard link or device member: nothing here to read. It is the sample's
            // image only if the sample has no real one.
            if IMAGE_EXTENSIONS.contains(&ext.as_str()) && sample.image.is_none() {
                let what = if kind.is_symlink() {
                    "a symlink"
                } else if kind.is_hard_link() {
                    "a hard link"
                } else {
                    "not a regular file"
                };
                let detail = format!("tar member `{path}` is {what}; only regular files are read");
                sample.image = Some((usize::MAX, Err(RejectReason::NotAFile { detail })));
            }
            continue;
        }
        if let Some(slot) = text_slot(opts, &ext) {
            let size = entry.header().size().unwrap_or(0);
            if size <= opts.max_record_bytes {
                let mut body = String::new();
                if entry.read_to_string(&mut body).is_ok() {
                    sample.text[slot] = Some(body);
                }
            }
            continue;
        }
        let rank = IMAGE_EXTENSIONS.iter().position(|e| *e == ext);
        let Some(rank) = rank else { continue };
        if sample.image.as_ref().is_some_and(|(r, _)| *r <= rank) {
            continue;
        }
        let size = entry.header().size().unwrap_or(0);
        let payload = if size > opts.max_record_bytes {
            Err(RejectReason::TooLarge {
                bytes: size,
                max_bytes: opts.max_record_bytes,
            })
        } else {
            let mut buf = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut buf)
                .map_err(|e| corrupt(format!("member `{path}` is cut short: {e}")))?;
            if (buf.len() as u64) < size {
                return Err(corrupt(format!(
                    "member `{path}` is cut short: {} of {size} bytes",
                    buf.len()
                )));
            }
            Ok(Bytes::from(buf))
        };
        sample.image = Some((rank, payload));
    }
    grouping.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_at_the_first_dot() {
        assert_eq!(split_member("000123.jpg"), ("000123".into(), "jpg".into()));
        assert_eq!(
            split_member("a/b/x.seg.PNG"),
            ("a/b/x".into(), "seg.png".into())
        );
        assert_eq!(split_member("noext"), ("noext".into(), "".into()));
    }
}
