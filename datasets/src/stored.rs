//! How the small training image is stored in the table: PNG, JPEG, lossless WebP, or raw RGB.
//!
//! Every format opens with `image::load_from_memory` (raw is binary PPM: the RGB bytes behind a
//! 15-byte `P6` header), so readers need not know which one a table holds.

use image::RgbImage;
use std::io::Cursor;

/// The stored image's encoding (`embed.output.image_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredFormat {
    /// Lossless, compact on flat art; the slowest to encode.
    #[default]
    Png,
    /// Lossy at `jpeg_quality`; the smallest on photos.
    Jpeg,
    /// Lossless WebP.
    Webp,
    /// Binary PPM: 3 bytes a pixel plus a header; nothing to encode or decode.
    Raw,
}

impl StoredFormat {
    /// Every format, in the order `bench` reports them.
    pub const ALL: [StoredFormat; 4] = [
        StoredFormat::Png,
        StoredFormat::Jpeg,
        StoredFormat::Webp,
        StoredFormat::Raw,
    ];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            StoredFormat::Png => "png",
            StoredFormat::Jpeg => "jpeg",
            StoredFormat::Webp => "webp",
            StoredFormat::Raw => "raw",
        }
    }

    /// Encodes `img`; `jpeg_quality` (1–100) applies to JPEG only.
    pub fn encode(self, img: &RgbImage, jpeg_quality: u8) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let result = match self {
            StoredFormat::Png => img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png),
            StoredFormat::Jpeg => {
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality)
                    .encode_image(img)
            }
            StoredFormat::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out).encode(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            ),
            StoredFormat::Raw => {
                let header = format!("P6\n{} {}\n255\n", img.width(), img.height());
                out.reserve(header.len() + img.as_raw().len());
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(img.as_raw());
                Ok(())
            }
        };
        result
            .map(|()| out)
            .map_err(|e| format!("{} encoding failed: {e}", self.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_opens_with_the_generic_reader() {
        let img = RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 15, 90]));
        for format in StoredFormat::ALL {
            let bytes = format.encode(&img, 95).unwrap();
            let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (24, 16), "{format:?}");
            let worst = img
                .as_raw()
                .iter()
                .zip(back.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            // Lossless formats give the pixels back; JPEG at 95 stays close on a gradient.
            let bound = if format == StoredFormat::Jpeg { 12 } else { 0 };
            assert!(worst <= bound, "{format:?}: worst pixel error {worst}");
        }
    }
}
