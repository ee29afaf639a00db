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
