//! Captioned image sets that ship in packages (`knn-diffusion data fetch <set>`): real images
//! with real captions, with no internet beyond the npm and Debian registries. Each set is
//! fetched once into a cache, turned into [`CaptionedImage`]s and written as img2dataset
//! parquet shards ([`crate::writer`]) to any store URL, where the readers read them back.
//!
//! | set | package | license | caption from |
//! |---|---|---|---|
//! | `twitter` | npm `emoji-datasource-twitter@16.0.0` | CC-BY-4.0 | CLDR name + `emoji.json` names |
//! | `openmoji` | npm `openmoji@17.0.0` (SVG, rasterised here) | CC-BY-SA-4.0 | CLDR annotation + tags |
//! | `openclipart` | Debian `openclipart-png` + `openclipart-svg` | public domain | SVG title + keywords |
//! | `fluent-3d` | npm `@lobehub/fluent-emoji-3d@1.1.0` | MIT | the same, by code point |
//!
//! The embedded default (Google's Noto emoji) is not here: it stays image-only, the set the
//! diffusion model learns from. Images are stored as PNG with alpha, their longer side at
//! most `max_side_px`. A file that does not decode or has no usable caption is not written;
//! it is counted by reason and a few are named in the summary.

mod archive;
mod emoji;
mod openclipart;

use crate::writer::{read_manifest, write_shards, CaptionedImage};
use crate::{DatasetError, Result, SourceLocation, StorageConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// A packaged captioned set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackagedSet {
    /// Twemoji, 64 px PNG.
    Twitter,
    /// OpenMoji, colour SVG.
    Openmoji,
    /// Openclipart, PNG of varied sizes.
    Openclipart,
    /// Microsoft Fluent 3D emoji, 256 px WebP.
    #[serde(rename = "fluent-3d")]
    Fluent3d,
}

/// npm `emoji-datasource-twitter`: Twemoji images and the emoji.json names.
const TWITTER: (&str, &str) = ("emoji-datasource-twitter", "16.0.0");
const OPENMOJI: (&str, &str) = ("openmoji", "17.0.0");
const FLUENT: (&str, &str) = ("@lobehub/fluent-emoji-3d", "1.1.0");

impl PackagedSet {
    /// Every set, in the order `data fetch all` writes them.
    pub const ALL: [PackagedSet; 4] = [
        PackagedSet::Twitter,
        PackagedSet::Openmoji,
        PackagedSet::Openclipart,
        PackagedSet::Fluent3d,
    ];

    /// Its name on the command line and in default output paths.
    pub fn name(self) -> &'static str {
        match self {
            PackagedSet::Twitter => "twitter",
            PackagedSet::Openmoji => "openmoji",
            PackagedSet::Openclipart => "openclipart",
            PackagedSet::Fluent3d => "fluent-3d",
        }
    }

    /// The set named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The packages it comes from, for the `source` column.
    pub fn source(self) -> String {
        match self {
            PackagedSet::Twitter => format!("npm:{}@{}", TWITTER.0, TWITTER.1),
            PackagedSet::Openmoji => format!("npm:{}@{}", OPENMOJI.0, OPENMOJI.1),
            PackagedSet::Openclipart => "debian:openclipart-png+openclipart-svg".into(),
            PackagedSet::Fluent3d => format!("npm:{}@{}", FLUENT.0, FLUENT.1),
        }
    }

    /// The images' license (SPDX).
    pub fn license(self) -> &'static str {
        match self {
            PackagedSet::Twitter => "CC-BY-4.0",
            PackagedSet::Openmoji => "CC-BY-SA-4.0",
            PackagedSet::Openclipart => "public-domain",
            PackagedSet::Fluent3d => "MIT",
        }
    }
}

/// What `fetch` is asked to do.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where the shards go: a local path or an s3/gs/az/file URL.
    pub out: String,
    /// Where downloaded packages are kept (fetched once).
    pub cache_dir: PathBuf,
    /// Rows per parquet shard.
    pub rows_per_shard: usize,
    /// Longer side of the stored images at most (larger ones are shrunk, keeping the aspect).
    pub max_side_px: u32,
}

/// What `fetch` did.
#[derive(Clone, Debug, Serialize)]
pub struct FetchSummary {
    /// The set.
    pub set: PackagedSet,
    /// Where its shards are.
    pub out: String,
    /// The set was already complete there; nothing was written.
    pub already_complete: bool,
    /// Shards written (or found).
    pub shards: usize,
    /// Records written (or found).
    pub rows: u64,
    /// Files not written, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// A few of them: (key, reason).
    pub reject_examples: Vec<(String, String)>,
    /// Wall time.
    pub elapsed_s: f64,
}

impl std::fmt::Display for FetchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.already_complete {
            "already complete"
        } else {
            "written"
        };
        writeln!(
            f,
            "data fetch {}: {} records in {} shards {verb} at {} ({:.1} s)",
            self.set.name(),
            self.rows,
            self.shards,
            self.out,
            self.elapsed_s
        )?;
        let total: u64 = self.rejected.values().sum();
        if total > 0 {
            let by: Vec<String> = self
                .rejected
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            writeln!(f, "  not written: {total} ({})", by.join("; "))?;
            for (key, why) in &self.reject_examples {
                writeln!(f, "    `{key}`: {why}")?;
            }
        }
        Ok(())
    }
}

/// A record before its image is normalised.
pub(super) struct Candidate {
    key: String,
    caption: String,
    image: Encoded,
}

enum Encoded {
    /// PNG, WebP or another raster format the `image` crate reads.
    Raster(Vec<u8>),
    /// An SVG document.
    Svg(Vec<u8>),
}

impl Candidate {
    fn raster(key: String, caption: String, bytes: Vec<u8>) -> Self {
        Self {
            key,
            caption,
            image: Encoded::Raster(bytes),
        }
    }

    fn svg(key: String, caption: String, bytes: Vec<u8>) -> Self {
        Self {
            key,
            caption,
            image: Encoded::Svg(bytes),
        }
    }
}

/// A file left out, and why.
pub(super) struct Rejected {
    key: String,
    reason: String,
}

impl Rejected {
    fn new(key: String, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}

/// Fetches `set` (once) and writes it as parquet shards to `opts.out`, unless a complete copy
/// is already there.
pub async fn fetch(
    set: PackagedSet,
    opts: &FetchOptions,
    storage: &StorageConfig,
) -> Result<FetchSummary> {
    let started = Instant::now();
    if let Some(dir) = local_dir(&opts.out) {
        std::fs::create_dir_all(&dir).map_err(|e| DatasetError::LocalIo {
            path: dir.clone(),
            source: e,
        })?;
    }
    let loc = SourceLocation::open(&opts.out, storage)?;
    let mut summary = FetchSummary {
        set,
        out: opts.out.clone(),
        already_complete: false,
        shards: 0,
        rows: 0,
        rejected: BTreeMap::new(),
        reject_examples: Vec::new(),
        elapsed_s: 0.0,
    };
    if let Some(m) = read_manifest(&loc).await? {
        if m.source == set.source() {
            summary.already_complete = true;
            summary.shards = m.shards.len();
            summary.rows = m.rows;
            summary.elapsed_s = started.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }
    let (cache, opts2) = (opts.cache_dir.clone(), opts.clone());
    let (records, rejected) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (candidates, mut rejected) = candidates(set, &cache)?;
        // Decoding and shrinking dominate: one worker per core, each its own slice.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let per = candidates.len().div_ceil(threads).max(1);
        let mut chunks: Vec<Vec<Candidate>> = Vec::new();
        let mut it = candidates.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(per).collect());
        }
        let max_side = opts2.max_side_px;
        let to_record = |c: Candidate| -> std::result::Result<CaptionedImage, Rejected> {
            match normalise(c.image, max_side) {
                Ok((png, width, height)) => Ok(CaptionedImage {
                    key: c.key,
                    png,
                    caption: c.caption,
                    license: set.license().into(),
                    source: set.source(),
                    width,
                    height,
                }),
                Err(why) => Err(Rejected::new(c.key, why)),
            }
        };
        let done: Vec<Vec<_>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| scope.spawn(move || chunk.into_iter().map(to_record).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an image worker panicked"))
                .collect()
        });
        let mut records = Vec::new();
        for r in done.into_iter().flatten() {
            match r {
                Ok(rec) => records.push(rec),
                Err(rej) => rejected.push(rej),
            }
        }
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records.dedup_by(|a, b| a.key == b.key);
        Ok((records, rejected))
    })
    .await
    .map_err(|e| DatasetError::Package {
        package: set.source(),
        reason: format!("conversion thread failed: {e}"),
    })??;
    if records.is_empty() {
        return Err(DatasetError::Package {
            package: set.source(),
            reason: format!(
                "no usable record in the package ({} files left out); nothing was written",
                rejected.len()
            ),
        });
    }
    for r in rejected {
        *summary.rejected.entry(r.reason.clone()).or_default() += 1;
        if summary.reject_examples.len() < 5 {
            summary.reject_examples.push((r.key, r.reason));
        }
    }
    let manifest = write_shards(&loc, &records, opts.rows_per_shard, &set.source()).await?;
    summary.shards = manifest.shards.len();
    summary.rows = manifest.rows;
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A local output path (to create), or `None` for a store URL.
fn local_dir(out: &str) -> Option<PathBuf> {
    if let Some(p) = out.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    (!out.contains("://")).then(|| PathBuf::from(out))
}

/// The set's files with captions, and those left out.
fn candidates(
    set: PackagedSet,
    cache: &std::path::Path,
) -> Result<(Vec<Candidate>, Vec<Rejected>)> {
    let (mut out, mut rejected) = (Vec::new(), Vec::new());
    let bad = |reason: String| DatasetError::Package {
        package: set.source(),
        reason,
    };
    let cldr = || -> Result<emoji::Cldr> {
        let tgz = archive::npm_pack(OPENMOJI.0, OPENMOJI.1, cache)?;
        let csv = archive::tgz_members(&tgz, |p| p == "package/data/openmoji.csv")?;
        let (_, bytes) = csv
            .into_iter()
            .next()
            .ok_or_else(|| bad("openmoji has no data/openmoji.csv".into()))?;
        emoji::Cldr::parse(&String::from_utf8_lossy(&bytes)).map_err(bad)
    };
    let emoji_names = |tgz: &std::path::Path| -> Result<emoji::EmojiNames> {
        let json = archive::tgz_members(tgz, |p| p == "package/emoji.json")?;
        let (_, bytes) = json
            .into_iter()
            .next()
            .ok_or_else(|| bad("the package has no emoji.json".into()))?;
        emoji::EmojiNames::parse(&bytes, &cldr()?).map_err(bad)
    };
    match set {
        PackagedSet::Twitter => {
            let tgz = archive::npm_pack(TWITTER.0, TWITTER.1, cache)?;
            let names = emoji_names(&tgz)?;
            let pngs = archive::tgz_members(&tgz, |p| {
                p.starts_with("package/img/twitter/64/") && p.ends_with(".png")
            })?;
            emoji::twitter(&names, pngs, &mut out, &mut rejected);
        }
        PackagedSet::Fluent3d => {
            let names = emoji_names(&archive::npm_pack(TWITTER.0, TWITTER.1, cache)?)?;
            let tgz = archive::npm_pack(FLUENT.0, FLUENT.1, cache)?;
            let webps = archive::tgz_members(&tgz, |p| {
                p.starts_with("package/assets/") && p.ends_with(".webp")
            })?;
            emoji::fluent(&names, webps, &mut out, &mut rejected);
        }
        PackagedSet::Openmoji => {
            let tgz = archive::npm_pack(OPENMOJI.0, OPENMOJI.1, cache)?;
            let svgs = archive::tgz_members(&tgz, |p| {
                p.starts_with("package/color/svg/") && p.ends_with(".svg")
            })?;
            emoji::openmoji(&cldr()?, svgs, &mut out, &mut rejected);
        }
        PackagedSet::Openclipart => {
            let png = archive::apt_download("openclipart-png", cache)?;
            let svg = archive::apt_download("openclipart-svg", cache)?;
            let root = cache.join("openclipart");
            archive::deb_unpack(&png, &root.join("png-deb"))?;
            archive::deb_unpack(&svg, &root.join("svg-deb"))?;
            // The two packages unpack into one tree each; the twins meet by relative path.
            let tree = root.join("tree");
            for (part, deb) in [("png", "png-deb"), ("svg", "svg-deb")] {
                let link = tree.join(part);
                if !link.exists() {
                    std::fs::create_dir_all(&tree).map_err(|e| DatasetError::LocalIo {
                        path: tree.clone(),
                        source: e,
                    })?;
                    let target = std::fs::canonicalize(root.join(deb))
                        .map_err(|e| DatasetError::LocalIo {
                            path: root.join(deb),
                            source: e,
                        })?
                        .join("usr/share/openclipart")
                        .join(part);
                    std::os::unix::fs::symlink(&target, &link).map_err(|e| {
                        DatasetError::LocalIo {
                            path: link.clone(),
                            source: e,
                        }
                    })?;
                }
            }
            openclipart::records(&tree, &mut out, &mut rejected);
        }
    }
    Ok((out, rejected))
}

/// The image as RGBA PNG with its longer side at most `max_side_px`: (bytes, width, height).
fn normalise(image: Encoded, max_side_px: u32) -> std::result::Result<(Vec<u8>, u32, u32), String> {
    let rgba = match image {
        Encoded::Raster(bytes) => {
            let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| format!("does not decode: {e}"))?;
            // Packaged clip art can be large (4000 px and more); bound it, but well above.
            let mut limits = image::Limits::default();
            limits.max_alloc = Some(1 << 30);
            reader.limits(limits);
            reader
                .decode()
                .map_err(|e| format!("does not decode: {e}"))?
                .to_rgba8()
        }
        Encoded::Svg(bytes) => rasterise(&bytes, max_side_px)?,
    };
    let (w, h) = rgba.dimensions();
    let rgba = if w.max(h) > max_side_px {
        let scale = max_side_px as f64 / w.max(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        shrink_rgba(&rgba, nw, nh)
    } else {
        rgba
    };
    let (w, h) = rgba.dimensions();
    let mut png = Vec::new();
    rgba.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("PNG encoding failed: {e}"))?;
    Ok((png, w, h))
}

/// Shrinks RGBA by averaging the pixels each output pixel covers (fast at any factor),
/// alpha premultiplied so transparent pixels do not bleed their colour into the edges.
fn shrink_rgba(img: &image::RgbaImage, w: u32, h: u32) -> image::RgbaImage {
    let mut premul = img.clone();
    for p in premul.pixels_mut() {
        let a = p[3] as u32;
        for c in 0..3 {
            p[c] = ((p[c] as u32 * a + 127) / 255) as u8;
        }
    }
    let mut out = image::imageops::thumbnail(&premul, w, h);
    for p in out.pixels_mut() {
        let a = p[3] as u32;
        for c in 0..3 {
            p[c] = match a {
                0 => 0,
                a => ((p[c] as u32 * 255 + a / 2) / a).min(255) as u8,
            };
        }
    }
    out
}

/// An SVG drawn with its longer side `side_px`, on a transparent background.
fn rasterise(svg: &[u8], side_px: u32) -> std::result::Result<image::RgbaImage, String> {
    use resvg::{tiny_skia, usvg};
    let tree = usvg::Tree::from_data(svg, &usvg::Options::default())
        .map_err(|e| format!("SVG does not parse: {e}"))?;
    let size = tree.size();
    let scale = side_px as f32 / size.width().max(size.height());
    let (w, h) = (
        ((size.width() * scale).round() as u32).max(1),
        ((size.height() * scale).round() as u32).max(1),
    );
    let mut pixmap = tiny_skia::Pixmap::new(w, h).ok_or("SVG has no area")?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    let mut rgba = image::RgbaImage::new(w, h);
    for (dst, src) in rgba.pixels_mut().zip(pixmap.pixels()) {
        let c = src.demultiply();
        *dst = image::Rgba([c.red(), c.green(), c.blue(), c.alpha()]);
    }
    Ok(rgba)
}
