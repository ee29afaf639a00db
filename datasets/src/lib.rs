//! Image records in object storage: the first stage of the knn-diffusion pipeline.
//!
//! This crate knows where images live and how to get them out safely; it knows nothing of
//! CLIP, Lance or training. It provides
//! - [`store`]: one [`object_store::ObjectStore`] for `s3://`, `gs://`, `az://`, `file://` and
//!   `memory://` URLs, with credentials from the environment or config ([`Secret`] never prints);
//! - [`shard`]: listing a source into [`Shard`]s and assigning them to workers deterministically;
//! - [`reader`]: streaming readers for img2dataset parquet, WebDataset tar and plain folders,
//!   each yielding [`RawRecord`]s with a stable id and bounded memory;
//! - [`decode`]: decoding with explicit limits (header-checked pixel counts, zero-length and
//!   truncated files), each failure a [`RejectReason`];
//! - [`resize`]: Pillow's antialiased resampling (SIMD, within a level) and center cropping;
//! - [`stored`]: the stored training image's encoding (PNG, JPEG, WebP, raw);
//! - [`split`]: the held-out split, a hash of each record's key;
//! - [`writer`]: img2dataset parquet shards written to any store;
//! - [`packaged`]: captioned image sets that ship in npm and Debian packages.
//!
//! A source is listed into shards, each shard streamed as records, each record decoded
//! within limits; an `s3://`, `gs://` or `az://` URL reads the same way as this folder:
//!
//! ```
//! use futures::TryStreamExt;
//! use knn_datasets::{decode_image, list_shards, read_shard, DecodeLimits, ListOptions};
//! use knn_datasets::{ReaderOptions, ShardFormat, SourceLocation, StorageConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! image::RgbImage::new(16, 8).save(dir.path().join("cat.png"))?;
//! image::RgbImage::new(24, 24).save(dir.path().join("dog.png"))?;
//! std::fs::write(dir.path().join("broken.png"), b"not a png")?;
//!
//! let url = dir.path().to_str().unwrap();
//! let source = SourceLocation::open(url, &StorageConfig::default())?;
//! let shards = list_shards(&source, ShardFormat::Folder, &ListOptions::default()).await?;
//! assert_eq!(shards.len(), 1);
//! let records: Vec<_> = read_shard(&source, &shards[0], &ReaderOptions::default())
//!     .try_collect()
//!     .await?;
//! let mut decoded: Vec<(String, Result<(u32, u32), &str>)> = records
//!     .iter()
//!     .map(|r| {
//!         let sizes = match &r.payload {
//!             Ok(bytes) => decode_image(bytes, &DecodeLimits::default())
//!                 .map(|img| (img.width, img.height))
//!                 .map_err(|why| why.code()),
//!             Err(why) => Err(why.code()),
//!         };
//!         (r.key.clone(), sizes)
//!     })
//!     .collect();
//! decoded.sort();
//! assert_eq!(decoded[1], ("cat.png".to_string(), Ok((16, 8))));
//! assert_eq!(decoded[2], ("dog.png".to_string(), Ok((24, 24))));
//! // A bad record is not dropped: it comes back with its key and the reason.
//! assert_eq!(decoded[0].0, "broken.png");
//! assert!(decoded[0].1.is_err());
//! # Ok(())
//! # }
//! ```

pub mod decode;
pub mod error;
pub mod packaged;
pub mod reader;
pub mod record;
pub mod resize;
pub mod secret;
pub mod shard;
pub mod split;
pub mod store;
pub mod stored;
pub mod unwritable;
pub mod writer;

pub use decode::{decode_image, DecodeLimits, RejectReason};
pub use error::{DatasetError, Result};
pub use reader::{read_shard, shard_schema, ReaderOptions, TextColumn, UniqueIds};
pub use record::{record_id, RawRecord};
pub use secret::Secret;
pub use shard::{assign_shards, list_shards, ListOptions, Refused, Shard, ShardFormat, ShardId};
pub use split::{HoldoutFractionOutOfRange, SplitConfig};
pub use store::{RetrySettings, SourceLocation, StorageConfig, TableMaintenance};
pub use unwritable::Unwritable;
