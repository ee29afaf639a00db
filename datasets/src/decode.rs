//! Decoding untrusted image bytes with explicit limits.
//!
//! Every failure is a [`RejectReason`], never a panic or an abort: the record is counted,
//! written to the rejects table with its id and the reason, and the run goes on. Pixel counts
//! are checked from the header before any pixel buffer exists, so a decompression bomb (a tiny
//! file declaring 100k x 100k pixels) costs nothing.

use image::{ImageError, ImageReader, RgbImage};
use std::io::Cursor;

/// Limits applied to each record.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest accepted width x height, read from the header before decoding.
    pub max_pixels: u64,
    /// Largest accepted encoded size in bytes.
    pub max_bytes: u64,
    /// Colour that transparent pixels are flattened onto.
    pub background: [u8; 3],
    /// Decode a JPEG at 1/4 or 1/8 of its size, in the IDCT, when both of its sides stay at
    /// least this many pixels (Pillow's `draft("RGB", (px, px))` rule, except that where
    /// Pillow would halve, the full-size decoder is faster here); 0 never does. `width` and
    /// `height` of the result stay the original's.
    pub jpeg_draft_px: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 64 * 1024 * 1024,
            max_bytes: 64 * 1024 * 1024,
            background: [255, 255, 255],
            jpeg_draft_px: 0,
        }
    }
}

/// Why a record cannot be used. `code()` is the short name counted in summaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Zero bytes.
    Empty,
    /// The encoded record is larger than `max_bytes`.
    TooLarge { bytes: u64, max_bytes: u64 },
    /// Not a recognised image format.
    NotAnImage { detail: String },
    /// The header declares more pixels than `max_pixels`.
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The data ends before the image does.
    Truncated { detail: String },
    /// The image data is invalid.
    Corrupt { detail: String },
    /// A container sample (WebDataset key, parquet row) has no image in it.
    NoImage { detail: String },
    /// The record's path leaves its source: a tar member named with `..` or an absolute path,
    /// or a folder symlink to a file outside the source (`embed.source.follow_symlinks`).
    UnsafePath { detail: String },
    /// The entry is not a regular file: a tar symlink or device member, a dangling symlink.
    NotAFile { detail: String },
    /// A second record with a key already read from the same shard; the first one is kept.
    DuplicateKey { detail: String },
    /// Two distinct keys of one shard whose 63-bit ids are equal; the first one is kept.
    IdCollision { detail: String },
    /// Decoding ran past its time budget (`embed.decode.timeout_ms`).
    Timeout { detail: String },
    /// The rest of a shard whose container breaks part way (a truncated tar, a bad parquet
    /// footer or page), kept as one reject when `embed.salvage_corrupt_shards` is on.
    CorruptShard { detail: String },
}

impl RejectReason {
    /// Short stable name, e.g. `truncated`.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::TooLarge { .. } => "too_large",
            RejectReason::NotAnImage { .. } => "not_an_image",
            RejectReason::TooManyPixels { .. } => "too_many_pixels",
            RejectReason::Truncated { .. } => "truncated",
            RejectReason::Corrupt { .. } => "corrupt",
            RejectReason::NoImage { .. } => "no_image",
            RejectReason::UnsafePath { .. } => "unsafe_path",
            RejectReason::NotAFile { .. } => "not_a_file",
            RejectReason::DuplicateKey { .. } => "duplicate_key",
            RejectReason::IdCollision { .. } => "id_collision",
            RejectReason::Timeout { .. } => "timeout",
            RejectReason::CorruptShard { .. } => "corrupt_shard",
        }
    }

    /// Human-readable detail.
    pub fn detail(&self) -> String {
        match self {
            RejectReason::Empty => "zero-length record".into(),
            RejectReason::TooLarge { bytes, max_bytes } => {
                format!("{bytes} bytes exceeds max_bytes = {max_bytes}")
            }
            RejectReason::TooManyPixels {
                width,
                height,
                max_pixels,
            } => format!("{width}x{height} exceeds max_pixels = {max_pixels}"),
            RejectReason::NotAnImage { detail }
            | RejectReason::Truncated { detail }
            | RejectReason::Corrupt { detail }
            | RejectReason::NoImage { detail }
            | RejectReason::UnsafePath { detail }
            | RejectReason::NotAFile { detail }
            | RejectReason::DuplicateKey { detail }
            | RejectReason::IdCollision { detail }
            | RejectReason::Timeout { detail }
            | RejectReason::CorruptShard { detail } => detail.clone(),
        }
    }
}

/// A decoded image in RGB with its original size.
#[derive(Debug)]
pub struct DecodedImage {
    /// Pixels, alpha flattened onto the configured background.
    pub rgb: RgbImage,
    /// Original width in pixels.
    pub width: u32,
    /// Original height in pixels.
    pub height: u32,
}

/// Decodes `bytes` within `limits`.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedImage, RejectReason> {
    if bytes.is_empty() {
        return Err(RejectReason::Empty);
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(RejectReason::TooLarge {
            bytes: bytes.len() as u64,
            max_bytes: limits.max_bytes,
        });
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| RejectReason::Corrupt {
                detail: e.to_string(),
            })
    };
    let probe = reader()?;
    let probe_format = probe.format();
    if probe_format.is_none() {
        return Err(RejectReason::NotAnImage {
            // The record's bytes are the user's data: say what was looked for, never echo them.
            detail: format!(
                "no PNG, JPEG, WebP, GIF or PNM signature at the start of its {} bytes",
                bytes.len()
            ),
        });
    }
    let (width, height) = probe.into_dimensions().map_err(classify)?;
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(RejectReason::TooManyPixels {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    let divisor = draft_divisor(width, height, limits.jpeg_draft_px);
    if divisor >= SCALED_DECODE_FROM && probe_format == Some(image::ImageFormat::Jpeg) {
        if let Some(rgb) = decode_jpeg_scaled(bytes, width, height, divisor)? {
            return Ok(DecodedImage { rgb, width, height });
        }
    }
    let mut reader = reader()?;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(width);
    image_limits.max_image_height = Some(height);
    // RGBA at 16 bits per channel is the largest buffer a decoder may need, plus slack.
    image_limits.max_alloc = Some(width as u64 * height as u64 * 8 + (1 << 20));
    reader.limits(image_limits);
    let img = reader.decode().map_err(classify)?;
    let rgb = if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        let back = limits.background.map(u32::from);
        let mut out = Vec::with_capacity(width as usize * height as usize * 3);
        for px in rgba.as_raw().chunks_exact(4) {
            let a = px[3] as u32;
            for c in 0..3 {
                out.push(((px[c] as u32 * a + back[c] * (255 - a) + 127) / 255) as u8);
            }
        }
        RgbImage::from_raw(width, height, out).expect("buffer sized width * height * 3")
    } else {
        img.into_rgb8()
    };
    Ok(DecodedImage { rgb, width, height })
}

/// Pillow's draft rule: the largest of 8, 4, 2 that divides both sides down to no less than
/// `need` pixels, else 1.
pub fn draft_divisor(width: u32, height: u32, need: u32) -> u32 {
    if need == 0 {
        return 1;
    }
    let scale = (width / need).min(height / need);
    [8, 4, 2].into_iter().find(|&d| scale >= d).unwrap_or(1)
}

/// Below this divisor the full-size decoder is used even when a draft is allowed: at 1/2,
/// jpeg-decoder's scaled IDCT took 1.5 ms where zune-jpeg's full decode took 1.1 ms (512 px,
/// 4:2:0, BENCHMARKS.md "image path"); from 1/4 on the scaled decode is the faster.
const SCALED_DECODE_FROM: u32 = 4;

/// A JPEG decoded at `1 / divisor` of its size (ceil of each side, as libjpeg's scaled IDCT
/// gives), or `None` when the scaled decoder does not handle it (CMYK, 12-bit, arithmetic
/// coding) and the full-size decoder should.
fn decode_jpeg_scaled(
    bytes: &[u8],
    width: u32,
    height: u32,
    divisor: u32,
) -> Result<Option<RgbImage>, RejectReason> {
    use jpeg_decoder::{Error, PixelFormat};
    let run = || -> Result<Option<RgbImage>, Error> {
        let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
        // The same bound as the full decode: 8 bytes a pixel of the original, plus slack.
        decoder.set_max_decoding_buffer_size(width as usize * height as usize * 8 + (1 << 20));
        decoder.read_info()?;
        let format = decoder.info().map(|i| i.pixel_format);
        if !matches!(format, Some(PixelFormat::RGB24 | PixelFormat::L8)) {
            return Ok(None);
        }
        let want = |side: u32| side.div_ceil(divisor).min(u16::MAX as u32) as u16;
        let (w, h) = decoder.scale(want(width), want(height))?;
        let pixels = decoder.decode()?;
        let rgb = match format {
            Some(PixelFormat::L8) => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            _ => pixels,
        };
        let (w, h) = (w as u32, h as u32);
        RgbImage::from_raw(w, h, rgb).map(Some).ok_or_else(|| {
            Error::Format(format!(
                "scaled decode gave a buffer that is not {w}x{h} RGB"
            ))
        })
    };
    match run() {
        Ok(img) => Ok(img),
        Err(Error::Unsupported(_)) => Ok(None),
        Err(err) => {
            let detail = err.to_string();
            Err(match err {
                Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    RejectReason::Truncated { detail }
                }
                _ if detail.to_lowercase().contains("eof") => RejectReason::Truncated { detail },
                _ => RejectReason::Corrupt { detail },
            })
        }
    }
}

fn classify(err: ImageError) -> RejectReason {
    let detail = err.to_string();
    let lower = detail.to_lowercase();
    match err {
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            RejectReason::Truncated { detail }
        }
        ImageError::Limits(_) => RejectReason::Corrupt {
            detail: format!("decoder exceeded its memory limit: {detail}"),
        },
        ImageError::Unsupported(_) => RejectReason::NotAnImage { detail },
        _ if lower.contains("eof")
            || lower.contains("end of file")
            || lower.contains("truncated")
            || lower.contains("unexpected end")
            || lower.contains("not enough data")
            || lower.contains("no more data") =>
        {
            RejectReason::Truncated { detail }
        }
        _ => RejectReason::Corrupt { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn good_png_decodes() {
        let d = decode_image(&png(20, 10), &DecodeLimits::default()).unwrap();
        assert_eq!((d.width, d.height), (20, 10));
        assert_eq!(d.rgb.get_pixel(3, 4).0, [3, 4, 7]);
    }

    #[test]
    fn bad_inputs_get_reasons() {
        let limits = DecodeLimits::default();
        assert_eq!(decode_image(&[], &limits).unwrap_err(), RejectReason::Empty);
        assert!(matches!(
            decode_image(b"hello world, not an image", &limits).unwrap_err(),
            RejectReason::NotAnImage { .. }
        ));
        let full = png(64, 64);
        let cut = &full[..full.len() / 2];
        assert!(matches!(
            decode_image(cut, &limits).unwrap_err(),
            RejectReason::Truncated { .. } | RejectReason::Corrupt { .. }
        ));
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let limits = DecodeLimits {
            max_pixels: 100,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png(20, 10), &limits).unwrap_err(),
            RejectReason::TooManyPixels {
                width: 20,
                height: 10,
                ..
            }
        ));
    }

    #[test]
    fn alpha_is_flattened_onto_the_background() {
        let img = image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0]));
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let d = decode_image(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(d.rgb.get_pixel(0, 0).0, [255, 255, 255]);
    }
}
