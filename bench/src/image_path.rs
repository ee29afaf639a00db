//! `knn-diffusion bench image-path`: one decode thread's work on web-like JPEGs, against
//! Pillow and HF's processor on one thread (python/bench_image_path.py) on the same files.
//!
//! The images are generated: luminance texture, slowly varying colour, hard-edged discs and
//! grain, JPEG quality 90 with 4:2:0 chroma (libjpeg's default, what img2dataset's shards
//! hold), longest side `--max-side` at five aspect ratios.

use anyhow::{Context, Result};
use clap::Args;
use knn_datasets::decode::{decode_image, DecodeLimits};
use knn_datasets::resize::Filter;
use knn_datasets::stored::StoredFormat;
use knn_indexer::clip::ClipImageProcessor;
use knn_indexer::embed::ImagePrep;
use knn_indexer::knn::quantizer::SplitMix;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `bench image-path`.
#[derive(Debug, Args)]
pub struct BenchImagePathArgs {
    /// Generated JPEGs.
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Longest side of the generated JPEGs.
    #[arg(long, default_value_t = 512)]
    pub max_side: u32,
    /// CLIP input side (shortest edge and crop).
    #[arg(long, default_value_t = 224)]
    pub clip_px: u32,
    /// Side of the stored training image.
    #[arg(long, default_value_t = 64)]
    pub stored_px: u32,
    /// Timed passes over the images (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Skip the Python reference.
    #[arg(long)]
    pub no_python: bool,
    /// Where the JPEGs are written.
    #[arg(long, default_value = "target/bench-image-path")]
    pub work: PathBuf,
    /// Markdown file whose section for this benchmark is replaced; `-` prints it only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

/// Uniform in `[lo, hi)` from a deterministic stream: the images are the same in every run.
fn uniform(rng: &mut SplitMix, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
}

/// A photo-like RGB image (the same recipe as python/make_image_fixture.py).
fn photo_like(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut waves = |count: usize, fmin: f64, fmax: f64, amp: (f64, f64)| {
        let mut out = vec![0f64; (w * h) as usize];
        for _ in 0..count {
            let (fx, fy) = (uniform(&mut rng, fmin, fmax), uniform(&mut rng, fmin, fmax));
            let phase = uniform(&mut rng, 0.0, std::f64::consts::TAU);
            let a = uniform(&mut rng, amp.0, amp.1);
            for (i, v) in out.iter_mut().enumerate() {
                let (x, y) = ((i as u32 % w) as f64, (i as u32 / w) as f64);
                *v += a * ((fx * x + fy * y) * std::f64::consts::TAU + phase).sin();
            }
        }
        out
    };
    let luma = waves(6, 0.002, 0.05, (10.0, 30.0));
    let colour: Vec<Vec<f64>> = (0..3)
        .map(|_| waves(3, 0.0005, 0.006, (15.0, 40.0)))
        .collect();
    let mut img: Vec<f64> = (0..(w * h) as usize)
        .flat_map(|i| (0..3).map(move |c| (i, c)))
        .map(|(i, c)| 128.0 + luma[i] + colour[c][i])
        .collect();
    for _ in 0..5 {
        let (cx, cy) = (
            uniform(&mut rng, 0.0, w as f64),
            uniform(&mut rng, 0.0, h as f64),
        );
        let r = uniform(&mut rng, 10.0, w.min(h) as f64 / 4.0);
        let fill = [0, 1, 2].map(|_| uniform(&mut rng, 0.0, 255.0));
        for (i, l) in luma.iter().enumerate() {
            let (x, y) = ((i as u32 % w) as f64, (i as u32 / w) as f64);
            if (x - cx).powi(2) + (y - cy).powi(2) < r * r {
                for c in 0..3 {
                    img[i * 3 + c] = fill[c] + 0.3 * l;
                }
            }
        }
    }
    img.iter()
        .map(|v| (v + uniform(&mut rng, -7.0, 7.0) + 0.5).clamp(0.0, 255.0) as u8)
        .collect()
}

/// A photo-like JPEG of `w` x `h` at `quality`, 4:2:0 (libjpeg's default).
pub(crate) fn photo_jpeg(w: u32, h: u32, seed: u64, quality: u8) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut bytes, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    enc.encode(
        &photo_like(w, h, seed),
        w as u16,
        h as u16,
        jpeg_encoder::ColorType::Rgb,
    )
    .context("encoding a generated JPEG")?;
    Ok(bytes)
}

/// Writes `n` JPEGs into `dir` (kept between runs when already there) and returns their bytes.
fn make_jpegs(dir: &Path, n: usize, max_side: u32) -> Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let aspects = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3)];
    (0..n)
        .map(|i| {
            let (a, b) = aspects[i % aspects.len()];
            let (w, h) = if a >= b {
                (max_side, max_side * b / a)
            } else {
                (max_side * a / b, max_side)
            };
            let path = dir.join(format!("{i:06}_{w}x{h}.jpg"));
            if let Ok(bytes) = std::fs::read(&path) {
                return Ok(bytes);
            }
            let bytes = photo_jpeg(w, h, i as u64, 90)?;
            std::fs::write(&path, &bytes)
                .with_context(|| format!("writing `{}`", path.display()))?;
            Ok(bytes)
        })
        .collect()
}

/// Images a second of `work` over every file, the median of `passes` timed passes after
/// an untimed one.
fn per_second(files: &[Vec<u8>], passes: usize, mut work: impl FnMut(&[u8])) -> f64 {
    for f in files {
        work(f);
    }
    let mut rates: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let start = Instant::now();
            for f in files {
                work(f);
            }
            files.len() as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn run_python(args: &BenchImagePathArgs, dir: &Path) -> Result<Value> {
    super::python_json(
        "python/bench_image_path.py",
        &[
            "--images".into(),
            dir.into(),
            "--size".into(),
            args.clip_px.to_string().into(),
            "--stored".into(),
            args.stored_px.to_string().into(),
            "--passes".into(),
            args.passes.to_string().into(),
        ],
    )
}

/// Rates of one pass set, in images per second.
struct Measured {
    files: usize,
    mean_kib: f64,
    need: u32,
    decode_draft: f64,
    decode_full: f64,
    decode_small: f64,
    ours_draft: f64,
    ours_full: f64,
    /// Per stored format: rate of the whole record and mean bytes of the stored image.
    stored: Vec<(StoredFormat, f64, f64)>,
}

/// Runs the benchmark and returns the markdown section.
pub fn run(args: &BenchImagePathArgs) -> Result<String> {
    let dir = args.work.join(format!("jpeg{}", args.max_side));
    eprintln!("generating {} JPEGs in {}...", args.images, dir.display());
    let files = make_jpegs(&dir, args.images, args.max_side)?;
    let measured = measure(args, &files);
    let python = if args.no_python {
        None
    } else {
        eprintln!("python reference...");
        Some(run_python(args, &dir)?)
    };
    let md = report(args, &dir, &measured, python.as_ref())?;
    if args.out.as_os_str() != "-" {
        super::write_section(&args.out, "image-path", &md)?;
    }
    Ok(md)
}

/// Our rates on `files`: decode alone, decode + CLIP input, and the whole record per
/// stored format.
fn measure(args: &BenchImagePathArgs, files: &[Vec<u8>]) -> Measured {
    let mean_kib = files.iter().map(Vec::len).sum::<usize>() as f64 / files.len() as f64 / 1024.0;
    let processor = ClipImageProcessor::for_image_size(args.clip_px);
    let need = args.clip_px.max(args.stored_px);
    let drafted = DecodeLimits {
        jpeg_draft_px: need,
        ..Default::default()
    };
    let full = DecodeLimits::default();
    let mut pixels = Vec::new();
    let mut preprocess = |limits: &DecodeLimits, f: &[u8]| {
        pixels.clear();
        let img = decode_image(f, limits).expect("generated JPEGs decode");
        processor.preprocess_into(&img.rgb, &mut pixels);
    };
    eprintln!("ours: decode + CLIP input...");
    let ours_draft = per_second(files, args.passes, |f| preprocess(&drafted, f));
    let ours_full = per_second(files, args.passes, |f| preprocess(&full, f));
    let decode_draft = per_second(files, args.passes, |f| {
        decode_image(f, &drafted).expect("decodes");
    });
    let decode_full = per_second(files, args.passes, |f| {
        decode_image(f, &full).expect("decodes");
    });
    // What a CLIP whose input is no larger than the stored image drafts to.
    let small = DecodeLimits {
        jpeg_draft_px: args.stored_px,
        ..Default::default()
    };
    let decode_small = per_second(files, args.passes, |f| {
        decode_image(f, &small).expect("decodes");
    });
    let mut stored = Vec::new();
    for format in StoredFormat::ALL {
        eprintln!(
            "ours: the whole record with a {} stored image...",
            format.name()
        );
        let prep = ImagePrep {
            limits: drafted,
            stored_px: args.stored_px,
            filter: Filter::Lanczos,
            format,
            jpeg_quality: 90,
            processor: processor.clone(),
        };
        let (mut bytes, mut pixels) = (0usize, Vec::new());
        let rate = per_second(files, args.passes, |f| {
            pixels.clear();
            bytes += prep.prepare(f, &mut pixels).expect("prepares").1.len();
        });
        let mean_bytes = bytes as f64 / (files.len() * (args.passes.max(1) + 1)) as f64;
        stored.push((format, rate, mean_bytes));
    }
    Measured {
        files: files.len(),
        mean_kib,
        need,
        decode_draft,
        decode_full,
        decode_small,
        ours_draft,
        ours_full,
        stored,
    }
}

/// The markdown section: our rates beside Python's, where it ran.
fn report(
    args: &BenchImagePathArgs,
    dir: &Path,
    m: &Measured,
    python: Option<&Value>,
) -> Result<String> {
    let py = |key: &str| python.and_then(|p| p[key].as_f64()).unwrap_or(f64::NAN);
    let mut md = String::new();
    writeln!(
        md,
        "### image path, one thread: {} JPEGs → {} px CLIP input + {} px stored image",
        m.files, args.clip_px, args.stored_px
    )?;
    writeln!(md)?;
    writeln!(md, "Machine: {}. Build: {}. Images: generated photo-like JPEGs, longest side {} at 1:1, 4:3, 3:4, 3:2, 2:3, quality 90, 4:2:0, {:.1} KiB on average (`{}`). Medians of {} passes.", super::machine(), super::build_profile(), args.max_side, m.mean_kib, dir.display(), args.passes)?;
    if let Some(p) = python {
        writeln!(
            md,
            "Peer: Pillow {} (libjpeg-turbo), transformers {} `CLIPImageProcessorPil`, one thread.",
            p["pillow"].as_str().unwrap_or("?"),
            p["transformers"].as_str().unwrap_or("?")
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "| measure | ours img/s | Python img/s | ours / Python |"
    )?;
    writeln!(md, "|---|---:|---:|---:|")?;
    let row = |md: &mut String, name: &str, ours: f64, theirs: f64| {
        if theirs.is_nan() {
            writeln!(md, "| {name} | {ours:.1} | – | – |")
        } else {
            writeln!(
                md,
                "| {name} | {ours:.1} | {theirs:.1} | {:.2} |",
                ours / theirs
            )
        }
    };
    row(
        &mut md,
        &format!("decode, drafted to ≥ {} px", m.need),
        m.decode_draft,
        f64::NAN,
    )?;
    row(&mut md, "decode, full size", m.decode_full, f64::NAN)?;
    row(
        &mut md,
        &format!(
            "decode, drafted to ≥ {} px (a CLIP input no larger)",
            args.stored_px
        ),
        m.decode_small,
        f64::NAN,
    )?;
    row(
        &mut md,
        &format!("decode drafted + {} px CLIP input", args.clip_px),
        m.ours_draft,
        py("draft_preprocess_img_per_s"),
    )?;
    row(
        &mut md,
        &format!("decode full size + {} px CLIP input", args.clip_px),
        m.ours_full,
        py("full_preprocess_img_per_s"),
    )?;
    let png = m.stored[0].1;
    row(
        &mut md,
        &format!(
            "the whole record: drafted, CLIP input, {} px stored PNG",
            args.stored_px
        ),
        png,
        py("draft_preprocess_store_img_per_s"),
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| stored image (`embed.output.image_format`) | whole record img/s | bytes per image |"
    )?;
    writeln!(md, "|---|---:|---:|")?;
    for (format, rate, bytes) in &m.stored {
        writeln!(md, "| {} | {rate:.1} | {bytes:.0} |", format.name())?;
    }
    Ok(md)
}
