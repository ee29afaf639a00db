//! Antialiased resampling with Pillow's filters, and the center crop of HF `transformers'`
//! image transforms.
//!
//! Why Pillow's: CLIP checkpoints were trained on images preprocessed by `CLIPImageProcessor`,
//! which resizes with Pillow's bicubic filter; a different resampler shifts embeddings. The
//! resampler is `fast_image_resize` (SIMD, the same two separable passes as Pillow's
//! `libImaging/Resample.c`, horizontal first, the filter widened by the downscale factor). It
//! rounds its coefficients to 16 bits where Pillow keeps 22, so a pixel may differ from
//! Pillow's by one 8-bit level: `datasets/tests/it/image_parity.rs` holds it to that against
//! Pillow's own output.

use fast_image_resize as fir;
use image::RgbImage;
use std::cell::RefCell;

/// A resampling filter (Pillow's names and kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Triangle kernel, support 1.
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (Pillow `BICUBIC`, CLIP's choice; Catmull-Rom).
    Bicubic,
    /// Lanczos with 3 lobes, support 3 (Pillow `LANCZOS`).
    Lanczos,
}

impl Filter {
    fn convolution(self) -> fir::ResizeAlg {
        fir::ResizeAlg::Convolution(match self {
            Filter::Bilinear => fir::FilterType::Bilinear,
            Filter::Bicubic => fir::FilterType::CatmullRom,
            Filter::Lanczos => fir::FilterType::Lanczos3,
        })
    }
}

thread_local! {
    // The resizer keeps its scratch buffers between calls: one per decode thread.
    static RESIZER: RefCell<fir::Resizer> = RefCell::new(fir::Resizer::new());
}

/// Resizes an RGB image to `width` x `height` as Pillow's `Image.resize` does (within one
/// level a pixel).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || img.width() == 0 || img.height() == 0 {
        return RgbImage::new(width, height);
    }
    // Pillow runs the horizontal pass first and rounds to 8 bits between the passes;
    // fast_image_resize runs the vertical one first for 8-bit pixels. The order decides how
    // a negative lobe's overshoot is clipped at a hard edge (up to 24 levels apart), so each
    // pass is asked for on its own, in Pillow's order.
    let across = if width != img.width() {
        Some(one_pass(
            img.as_raw(),
            img.dimensions(),
            (width, img.height()),
            filter,
        ))
    } else {
        None
    };
    let out = if height != img.height() {
        let src = across.as_deref().unwrap_or(img.as_raw());
        one_pass(src, (width, img.height()), (width, height), filter)
    } else {
        across.expect("the sizes differ in width when not in height")
    };
    RgbImage::from_raw(width, height, out).expect("buffer sized width * height * 3")
}

/// One resampling pass (the sizes differ along one axis only).
fn one_pass(src: &[u8], from: (u32, u32), to: (u32, u32), filter: Filter) -> Vec<u8> {
    let src = fir::images::ImageRef::new(from.0, from.1, src, fir::PixelType::U8x3)
        .expect("the buffer holds width * height * 3 bytes");
    let mut dst = fir::images::Image::new(to.0, to.1, fir::PixelType::U8x3);
    let options = fir::ResizeOptions::new().resize_alg(filter.convolution());
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .expect("same pixel type on both sides and a non-empty source");
    dst.into_vec()
}

/// The size HF's `get_resize_output_image_size(default_to_square=False)` gives when the
/// shorter side becomes `shortest_px`: the longer side is truncated, not rounded.
pub fn shortest_side_size(width: u32, height: u32, shortest_px: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (shortest_px as u64 * long as u64 / short.max(1) as u64) as u32;
    if width <= height {
        (shortest_px, new_long)
    } else {
        (new_long, shortest_px)
    }
}

/// Crops the center `width` x `height` window, padding with black where the image is smaller,
/// with the offsets of HF `image_transforms.center_crop`.
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let offset = |orig: u32, crop: u32| -> i64 {
        if orig >= crop {
            ((orig - crop) / 2) as i64
        } else {
            -(((crop - orig) / 2) as i64)
        }
    };
    let (left, top) = (offset(img.width(), width), offset(img.height(), height));
    if (left, top) == (0, 0) && img.dimensions() == (width, height) {
        return img.clone();
    }
    let mut out = RgbImage::new(width, height);
    // Copy the overlapping span of each row; the rest stays black.
    let x0 = left.max(0);
    let x1 = (left + width as i64).min(img.width() as i64);
    if x1 > x0 {
        let span = (x1 - x0) as usize * 3;
        let dst_x = (x0 - left) as usize * 3;
        let (src, dst) = (img.as_raw(), &mut *out);
        for y in 0..height as i64 {
            let sy = y + top;
            if sy < 0 || sy >= img.height() as i64 {
                continue;
            }
            let s = (sy as usize * img.width() as usize + x0 as usize) * 3;
            let d = y as usize * width as usize * 3 + dst_x;
            dst[d..d + span].copy_from_slice(&src[s..s + span]);
        }
    }
    out
}

/// Shortest side to `size_px` with `filter`, then the center `size_px` square: the training
/// image and the CLIP input are both made this way.
pub fn resize_and_center_crop(img: &RgbImage, size_px: u32, filter: Filter) -> RgbImage {
    let (w, h) = shortest_side_size(img.width(), img.height(), size_px);
    if (w, h) == img.dimensions() {
        return center_crop(img, size_px, size_px);
    }
    center_crop(&resize(img, w, h, filter), size_px, size_px)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn constant_images_stay_constant() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
            let out = resize(&img, 11, 50, filter);
            assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{filter:?}");
        }
    }

    #[test]
    fn shortest_side_truncates_like_hf() {
        assert_eq!(shortest_side_size(640, 480, 224), (298, 224));
        assert_eq!(shortest_side_size(480, 640, 224), (224, 298));
        assert_eq!(shortest_side_size(64, 64, 224), (224, 224));
    }

    #[test]
    fn crop_pads_small_images_like_hf() {
        let img = gradient(5, 5);
        let out = center_crop(&img, 8, 8);
        // (8 - 5) / 2 = 1 column of padding on the left.
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 1), img.get_pixel(0, 0));
    }

    #[test]
    fn crop_matches_a_pixel_by_pixel_reference() {
        let img = gradient(9, 6);
        for (w, h) in [(9, 6), (4, 3), (3, 6), (12, 8), (9, 11), (1, 1)] {
            let left = if img.width() >= w {
                ((img.width() - w) / 2) as i64
            } else {
                -(((w - img.width()) / 2) as i64)
            };
            let top = if img.height() >= h {
                ((img.height() - h) / 2) as i64
            } else {
                -(((h - img.height()) / 2) as i64)
            };
            let want = RgbImage::from_fn(w, h, |x, y| {
                let (sx, sy) = (x as i64 + left, y as i64 + top);
                if sx >= 0 && sy >= 0 && sx < 9 && sy < 6 {
                    *img.get_pixel(sx as u32, sy as u32)
                } else {
                    image::Rgb([0, 0, 0])
                }
            });
            assert_eq!(center_crop(&img, w, h), want, "{w}x{h}");
        }
    }

    #[test]
    fn output_has_requested_size() {
        let out = resize_and_center_crop(&gradient(100, 40), 32, Filter::Bicubic);
        assert_eq!(out.dimensions(), (32, 32));
    }
}
