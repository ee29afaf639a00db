//! Our image path against Pillow 13 (`python/make_image_fixture.py`, run by scripts/test.sh):
//! the SIMD resampler within two 8-bit levels of `Image.resize` for each filter (a pixel in a
//! hundred is one level off, a few in ten thousand two: 16-bit coefficients against Pillow's
//! 22), and the scaled JPEG decode against `Image.draft`.

use image::RgbImage;
use knn_datasets::decode::{decode_image, draft_divisor, DecodeLimits};
use knn_datasets::resize::{resize, resize_and_center_crop, Filter};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/image");
    assert!(
        dir.join("reference.json").is_file(),
        "{} is missing: run `bash scripts/test.sh` (it runs python/make_image_fixture.py)",
        dir.display()
    );
    dir
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap())
        .unwrap()
}

fn open(file: &str) -> RgbImage {
    image::open(fixture_dir().join(file)).unwrap().to_rgb8()
}

/// (largest, mean) absolute difference over every channel of every pixel.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut worst, mut sum) = (0u8, 0u64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        worst = worst.max(d);
        sum += d as u64;
    }
    (worst, sum as f64 / a.as_raw().len() as f64)
}

#[test]
fn resampling_is_within_two_levels_of_pillow() {
    let r = reference();
    let cases = r["resize"].as_array().unwrap();
    assert!(cases.len() >= 45);
    for case in cases {
        let filter = match case["filter"].as_str().unwrap() {
            "bilinear" => Filter::Bilinear,
            "bicubic" => Filter::Bicubic,
            "lanczos" => Filter::Lanczos,
            other => panic!("unknown filter {other}"),
        };
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let ours = resize(&open(case["source"].as_str().unwrap()), w, h, filter);
        let (worst, mean) = diff(&ours, &open(case["file"].as_str().unwrap()));
        assert!(
            worst <= 2 && mean <= 0.02,
            "{}: {worst} levels from Pillow at worst (mean {mean:.4})",
            case["file"]
        );
    }
}

#[test]
fn scaled_jpeg_decode_follows_pillows_draft() {
    let r = reference();
    for case in r["jpeg"].as_array().unwrap() {
        let bytes = std::fs::read(fixture_dir().join(case["file"].as_str().unwrap())).unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let full = decode_image(&bytes, &DecodeLimits::default()).unwrap();
        let (worst, mean) = diff(&full.rgb, &open(case["full"].as_str().unwrap()));
        // zune-jpeg and libjpeg-turbo round their IDCT and chroma upsampling differently.
        assert!(
            mean <= 1.0 && worst <= 24,
            "{}: full decode {worst} / mean {mean:.3} from Pillow",
            case["file"]
        );
        for draft in case["drafts"].as_array().unwrap() {
            let side = draft["side"].as_u64().unwrap() as u32;
            let limits = DecodeLimits {
                jpeg_draft_px: side,
                ..Default::default()
            };
            let ours = decode_image(&bytes, &limits).unwrap();
            assert_eq!(
                (ours.width, ours.height),
                (w, h),
                "the original size is kept"
            );
            let pillow = open(draft["file"].as_str().unwrap());
            let divisor = draft_divisor(w, h, side);
            if divisor < 4 {
                // Halving is left to the full-size decoder (faster here than jpeg-decoder's
                // scaled IDCT at 1/2).
                assert_eq!(ours.rgb.dimensions(), (w, h), "{}", case["file"]);
                continue;
            }
            assert_eq!(
                ours.rgb.dimensions(),
                pillow.dimensions(),
                "{} drafted to {side}: the divisor is Pillow's ({divisor})",
                case["file"],
            );
            // jpeg-decoder's scaled IDCT keeps less chroma detail than libjpeg-turbo's (it
            // shrinks the chroma planes too, then upsamples), so the decodes differ at colour
            // edges. What counts is the image CLIP and training get: after the resize, ours
            // must stay about as close to the full-size reference as Pillow's draft does.
            let filter = if side >= 224 {
                Filter::Bicubic
            } else {
                Filter::Lanczos
            };
            let reference = resize_and_center_crop(&full.rgb, side, filter);
            let (_, ours_off) = diff(&resize_and_center_crop(&ours.rgb, side, filter), &reference);
            let (_, pillow_off) = diff(&resize_and_center_crop(&pillow, side, filter), &reference);
            assert!(
                ours_off <= 1.5 * pillow_off + 0.5,
                "{} drafted to {side}: {ours_off:.3} levels from the full decode on average, \
                 Pillow's draft {pillow_off:.3}",
                case["file"]
            );
        }
    }
}

#[test]
fn a_truncated_jpeg_is_rejected_in_the_scaled_decoder_too() {
    let r = reference();
    let case = &r["jpeg"][0];
    let bytes = std::fs::read(fixture_dir().join(case["file"].as_str().unwrap())).unwrap();
    let limits = DecodeLimits {
        jpeg_draft_px: 64,
        ..Default::default()
    };
    for cut in [bytes.len() / 3, bytes.len() - 20] {
        match decode_image(&bytes[..cut], &limits) {
            Err(reason) => assert!(
                ["truncated", "corrupt"].contains(&reason.code()),
                "{}",
                reason.code()
            ),
            // A decoder may fill a cut-short scan with grey, as libjpeg does; the size holds.
            Ok(img) => assert_eq!(img.rgb.width(), 512_u32.div_ceil(4)),
        }
    }
}
