//! WebDataset shards: a tar whose consecutive members sharing a key (the file name up to its
//! first dot, with its directory) form one sample. The sample's image member (jpg, jpeg, png,
//! webp, gif or bmp, in that preference) is the record; a text column `c` is read from the
//! member with extension `c` (a `caption` also from `txt`, img2dataset's name); other members
//! are ignored.
//! The tar is streamed from the store and parsed on a blocking thread; records cross to async
//! code through a bounded channel, so memory holds one sample at a time.

use super::ReaderOptions;
use crate::shard::IMAGE_EXTENSIONS;
use crate::{
    record_id, DatasetError, RawRecord, RejectReason, Result, Shard, ShardId, SourceLocation,
};
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
        let reader = SyncIoBridge::new(StreamReader::new(body.map_err(std::io::Error::other)));
        let shard_id = shard.id.clone();
        let err_tx = tx.clone();
        let joined = tokio::task::spawn_blocking(move || {
            if let Err(e) = parse(reader, &shard_id, &opts, &tx) {
                let _ = tx.blocking_send(Err(e));
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
    fn into_record(self, shard: &ShardId) -> RawRecord {
        let payload = match self.image {
            Some((_, p)) => p,
            None => Err(RejectReason::NoImage {
                detail: format!(
                    "sample has members [{}] but no image",
                    self.members.join(", ")
                ),
            }),
        };
        RawRecord {
            id: record_id(shard, &self.key),
            key: self.key,
            shard: shard.clone(),
            payload,
            text: self.text,
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
    let mut current: Option<Sample> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(format!("bad tar member: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| corrupt(format!("bad member name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let (key, ext) = split_member(&path);
        if current.as_ref().is_some_and(|s| s.key != key) {
            let done = current.take().expect("checked above");
            if tx.blocking_send(Ok(done.into_record(shard))).is_err() {
                return Ok(()); // the consumer stopped reading
            }
        }
        let sample = current.get_or_insert_with(|| Sample {
            key: key.clone(),
            members: Vec::new(),
            image: None,
            text: vec![None; opts.text_columns.len()],
        });
        sample.members.push(ext.clone());
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
    if let Some(last) = current {
        let _ = tx.blocking_send(Ok(last.into_record(shard)));
    }
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
