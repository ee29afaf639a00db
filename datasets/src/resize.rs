//! Antialiased resampling that matches Pillow's `Image.resize` bit for bit on 8-bit RGB, and
//! the center crop of HF `transformers`' image transforms.
//!
//! Why Pillow-exact: CLIP checkpoints were trained on images preprocessed by
//! `CLIPImageProcessor`, which resizes with Pillow's bicubic filter; a different resampler
//! shifts embeddings. The algorithm is Pillow's `libImaging/Resample.c` (two separable passes,
//! horizontal first, each rounding to 8 bits with 22-bit fixed-point coefficients; the filter
//! is widened by the downscale factor, which is what makes it antialiased).

use image::RgbImage;

/// A resampling filter (Pillow's names and kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Triangle kernel, support 1.
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (Pillow `BICUBIC`, CLIP's choice).
    Bicubic,
    /// Lanczos with 3 lobes, support 3 (Pillow `LANCZOS`).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one pass: for each output index, the first input index, the
/// number of taps, and `ksize` coefficients.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let in0 = 0.0f64;
    let in1 = in_size as f32 as f64;
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut pre = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; Rust's `as` does the same.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, p) in pre.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *p = w;
            ww += w;
        }
        let row = &mut kk[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { pre[x] / ww } else { pre[x] };
            let scaled = w * (1u64 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `width` x `height` exactly as Pillow's `Image.resize` does.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return img.clone();
    }
    let horiz = precompute(in_w, out_w, filter);
    let vert = precompute(in_h, out_h, filter);
    let src = img.as_raw();

    // Horizontal pass over the rows the vertical pass will read.
    let (y_first, y_last) = if out_h != in_h {
        let last = vert.bounds[out_h - 1];
        (vert.bounds[0].0, last.0 + last.1)
    } else {
        (0, in_h)
    };
    let (tmp, tmp_w, tmp_y0) = if out_w != in_w {
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for r in 0..rows {
            let in_row = &src[(r + y_first) * in_w * 3..(r + y_first + 1) * in_w * 3];
            let out_row = &mut tmp[r * out_w * 3..(r + 1) * out_w * 3];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.kk[xx * horiz.ksize..xx * horiz.ksize + xmax];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (t, &kv) in k.iter().enumerate() {
                    let p = (xmin + t) * 3;
                    acc[0] += in_row[p] as i32 * kv;
                    acc[1] += in_row[p + 1] as i32 * kv;
                    acc[2] += in_row[p + 2] as i32 * kv;
                }
                out_row[xx * 3] = clip8(acc[0]);
                out_row[xx * 3 + 1] = clip8(acc[1]);
                out_row[xx * 3 + 2] = clip8(acc[2]);
            }
        }
        (tmp, out_w, y_first)
    } else {
        (src.to_vec(), in_w, 0)
    };

    let out = if out_h != in_h {
        let mut out = vec![0u8; out_h * out_w * 3];
        for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
            let k = &vert.kk[yy * vert.ksize..yy * vert.ksize + ymax];
            let out_row = &mut out[yy * out_w * 3..(yy + 1) * out_w * 3];
            for (i, o) in out_row.iter_mut().enumerate() {
                let mut acc = 1i32 << (PRECISION_BITS - 1);
                for (t, &kv) in k.iter().enumerate() {
                    acc += tmp[(ymin - tmp_y0 + t) * tmp_w * 3 + i] as i32 * kv;
                }
                *o = clip8(acc);
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(width, height, out).expect("buffer sized width * height * 3")
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
