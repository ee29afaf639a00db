//! Folder shards: each image file is a record whose key is its path below the source URL.
//! Entries the listing refused (dangling or escaping symlinks) come first, as rejects.

use super::ReaderOptions;
use crate::{DatasetError, RawRecord, RejectReason, Result, Shard, SourceLocation};
use futures::stream::{self, BoxStream, StreamExt};

pub(super) fn read(
    loc: SourceLocation,
    shard: Shard,
    opts: ReaderOptions,
) -> BoxStream<'static, Result<RawRecord>> {
    if let Some(t) = opts.text_columns.first() {
        // A folder of images carries no text: say which setting asked for some.
        let err = DatasetError::MissingColumn {
            shard: shard.id.to_string(),
            column: t.name.clone(),
            available: "only images: a folder source has no text columns".into(),
            key: t.config_key.clone(),
        };
        return stream::once(async move { Err(err) }).boxed();
    }
    let shard_id = shard.id.clone();
    let refused: Vec<Result<RawRecord>> = shard
        .refused
        .into_iter()
        .map(|r| Ok(RawRecord::new(&shard.id, r.key, Err(r.reason), Vec::new())))
        .collect();
    let read = stream::iter(shard.objects)
        .map(move |meta| {
            let loc = loc.clone();
            let shard_id = shard_id.clone();
            let max = opts.max_record_bytes;
            async move {
                let url = loc.url_of(&meta.location);
                let key = url
                    .strip_prefix(loc.url.trim_end_matches('/'))
                    .unwrap_or(&url)
                    .trim_start_matches('/')
                    .to_string();
                let payload = if meta.size > max {
                    Err(RejectReason::TooLarge {
                        bytes: meta.size,
                        max_bytes: max,
                    })
                } else {
                    let got = loc
                        .store
                        .get_opts(&meta.location, Default::default())
                        .await
                        .map_err(|e| DatasetError::from_store(&url, e))?;
                    Ok(got
                        .bytes()
                        .await
                        .map_err(|e| DatasetError::from_store(&url, e))?)
                };
                Ok(RawRecord::new(&shard_id, key, payload, Vec::new()))
            }
        })
        .buffered(opts.fetch_concurrency.max(1));
    stream::iter(refused).chain(read).boxed()
}
