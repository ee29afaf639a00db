//! The indexer: CLIP in tch, and the embed stage that turns image records into a Lance table
//! of CLIP embeddings (PAPER.md: `f_img(I)` for every image of the database).
//!
//! - [`clip`]: the model, its preprocessing and tokenizer, HF checkpoint loading;
//! - [`embed`](mod@embed): the stage: fetch → decode/resize → batch → CLIP → Lance, sharded over
//!   workers, exactly once per shard ([`ledger`]), resumable;
//! - [`table`]: the output tables' schemas and the shard-committing writer;
//! - [`knn`]: nearest neighbours: `build-index`, batch `precompute-knn`, the [`Retriever`].
//!
//! The embed stage on a folder of images, with a random-weight CLIP (`[clip] checkpoint`
//! names an HF one), then the images nearest a query vector:
//!
//! ```
//! use knn_datasets::StorageConfig;
//! use knn_indexer::{embed, EmbedConfig, EmbedProgress, Retriever};
//! use std::sync::Arc;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let images = dir.path().join("images");
//! std::fs::create_dir(&images)?;
//! for i in 0..6u8 {
//!     let img = image::RgbImage::from_fn(20, 20, |x, y| image::Rgb([x as u8 * 12, y as u8 * i, i * 40]));
//!     img.save(images.join(format!("{i}.png")))?;
//! }
//! let table = dir.path().join("emb.lance");
//! let cfg: EmbedConfig = toml::from_str(&format!(
//!     "[source]\nurl = {:?}\nformat = \"folder\"\n\
//!      [output]\ntable = {:?}\nimage_size_px = 16\n\
//!      [clip]\ndevice = \"cpu\"\n",
//!     images.display().to_string(),
//!     table.display().to_string(),
//! ))?;
//! let storage = StorageConfig::default();
//! let progress = Arc::new(EmbedProgress::default());
//! let summary = embed(&cfg, &storage, (0, 1), progress).await?;
//! assert_eq!((summary.images_ok, summary.rejected_total()), (6, 0));
//!
//! let retriever = Retriever::open(table.to_str().unwrap(), &storage).await?;
//! let query = vec![1.0 / (retriever.dim() as f32).sqrt(); retriever.dim()];
//! let nearest = retriever.search(&query, 3).await?;
//! assert_eq!(nearest.ids.len(), 3);
//! assert!(nearest.sims.windows(2).all(|w| w[0] >= w[1]), "most similar first");
//! # Ok(())
//! # }
//! ```

pub mod bench;
pub mod clip;
pub mod embed;
pub mod error;
pub mod knn;
pub mod ledger;
pub mod retry;
pub mod score;
pub mod table;

pub use embed::{embed, EmbedConfig, EmbedProgress, EmbedSummary};
pub use error::{IndexerError, Result};
pub use knn::{precompute_knn, Retriever};
pub use knn_datasets::Unwritable;
