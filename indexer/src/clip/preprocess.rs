//! Image preprocessing identical to HF `transformers`' `CLIPImageProcessor` (the Pillow-based
//! one): shortest side resized with Pillow's bicubic filter, center crop, rescale by 1/255,
//! normalise with the CLIP mean and std, channels first. Settings come from the checkpoint's
//! `preprocessor_config.json` when it has one.

use image::RgbImage;
use knn_datasets::resize::{center_crop, resize, shortest_side_size, Filter};
use serde::Deserialize;
use serde_json::Value;

/// OpenAI CLIP's per-channel mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation.
// (f32 literals: HF writes 0.26130258 and 0.27577711, which round to these.)
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The fields of `preprocessor_config.json` that CLIP uses.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct RawProcessorConfig {
    do_resize: bool,
    size: Value,
    resample: u8,
    do_center_crop: bool,
    crop_size: Value,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: Vec<f32>,
    image_std: Vec<f32>,
}

impl Default for RawProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: Value::from(224),
            resample: 3,
            do_center_crop: true,
            crop_size: Value::from(224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN.to_vec(),
            image_std: CLIP_STD.to_vec(),
        }
    }
}

/// CLIP image preprocessing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipImageProcessor {
    /// Shortest side after resizing (None: no resize).
    pub shortest_edge: Option<u32>,
    /// Resampling filter.
    pub filter: Filter,
    /// Center crop (width, height) (None: no crop).
    pub crop: Option<(u32, u32)>,
    /// Multiplier applied to 8-bit values (None: none).
    pub rescale_factor: Option<f64>,
    /// Mean and std per channel (None: no normalisation).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ClipImageProcessor {
    /// CLIPImageProcessor's defaults for a model with `image_size` px input.
    pub fn for_image_size(image_size: u32) -> Self {
        Self {
            shortest_edge: Some(image_size),
            filter: Filter::Bicubic,
            crop: Some((image_size, image_size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// Parses `preprocessor_config.json` text.
    pub fn from_json(text: &str) -> crate::Result<Self> {
        let bad = |reason: String| crate::IndexerError::ProcessorConfig { reason };
        let raw: RawProcessorConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let side = |v: &Value, keys: &[&str]| -> Option<u32> {
            if let Some(n) = v.as_u64() {
                return Some(n as u32);
            }
            keys.iter()
                .find_map(|k| v.get(k).and_then(Value::as_u64))
                .map(|n| n as u32)
        };
        let filter = match raw.resample {
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            other => {
                return Err(bad(format!(
                    "resample = {other} is not supported (use 1, 2 or 3)"
                )))
            }
        };
        let shortest_edge = if raw.do_resize {
            Some(
                side(&raw.size, &["shortest_edge"])
                    .ok_or_else(|| bad("`size` must be a number or have `shortest_edge`".into()))?,
            )
        } else {
            None
        };
        let crop = if raw.do_center_crop {
            let w = side(&raw.crop_size, &["width"])
                .ok_or_else(|| bad("`crop_size` needs a width".into()))?;
            let h = side(&raw.crop_size, &["height"]).unwrap_or(w);
            Some((w, h))
        } else {
            None
        };
        let three = |v: &[f32], name: &str| -> crate::Result<[f32; 3]> {
            v.try_into()
                .map_err(|_| bad(format!("`{name}` must have 3 values, has {}", v.len())))
        };
        Ok(Self {
            shortest_edge,
            filter,
            crop,
            rescale_factor: raw.do_rescale.then_some(raw.rescale_factor),
            normalize: if raw.do_normalize {
                Some((
                    three(&raw.image_mean, "image_mean")?,
                    three(&raw.image_std, "image_std")?,
                ))
            } else {
                None
            },
        })
    }

    /// `preprocessor_config.json` in HF's layout, as `CLIPImageProcessor` reads it.
    pub fn to_json(&self) -> String {
        let resample = match self.filter {
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
        };
        let (mean, std) = self.normalize.unwrap_or((CLIP_MEAN, CLIP_STD));
        let (cw, ch) = self.crop.unwrap_or((0, 0));
        let v = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.shortest_edge.is_some(),
            "size": {"shortest_edge": self.shortest_edge.unwrap_or(0)},
            "resample": resample,
            "do_center_crop": self.crop.is_some(),
            "crop_size": {"height": ch, "width": cw},
            "do_rescale": self.rescale_factor.is_some(),
            "rescale_factor": self.rescale_factor.unwrap_or(1.0 / 255.0),
            "do_normalize": self.normalize.is_some(),
            "image_mean": mean,
            "image_std": std,
            "do_convert_rgb": true,
        });
        serde_json::to_string_pretty(&v).expect("a JSON value serialises")
    }

    /// Output (width, height) for an input of the given size.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        match (self.crop, self.shortest_edge) {
            (Some(c), _) => c,
            (None, Some(s)) => shortest_side_size(width, height, s),
            (None, None) => (width, height),
        }
    }

    /// The side a decoder may shrink an image to before preprocessing without changing what
    /// preprocessing does with it (both sides at least the resize and the crop); `None` when
    /// preprocessing does not resize, so the input size is the model's.
    pub fn draft_side(&self) -> Option<u32> {
        let crop = self.crop.map_or(0, |(w, h)| w.max(h));
        self.shortest_edge.map(|s| s.max(crop))
    }

    /// Appends the preprocessed image, channels first (`3 x H x W` f32), to `out`.
    pub fn preprocess_into(&self, img: &RgbImage, out: &mut Vec<f32>) {
        self.normalize_into(&self.geometry(img), out);
    }

    /// The resize and center crop of preprocessing: an 8-bit image of the model's input
    /// size (what `train-clip` stores, so training normalises only).
    pub fn geometry(&self, img: &RgbImage) -> RgbImage {
        let mut out = match self.shortest_edge {
            Some(s) => {
                let (w, h) = shortest_side_size(img.width(), img.height(), s);
                resize(img, w, h, self.filter)
            }
            None => img.clone(),
        };
        if let Some((w, h)) = self.crop {
            out = center_crop(&out, w, h);
        }
        out
    }

    /// The rescale and normalisation of preprocessing, appended channels first to `out`.
    pub fn normalize_into(&self, img: &RgbImage, out: &mut Vec<f32>) {
        let plane = img.width() as usize * img.height() as usize;
        // An 8-bit value has 256 results per channel: a table gives each pixel its floats
        // with no arithmetic, bit for bit what the formula gives.
        let luts: [[f32; 256]; 3] = std::array::from_fn(|c| {
            let (mean, std) = match self.normalize {
                Some((m, s)) => (m[c], s[c]),
                None => (0.0, 1.0),
            };
            std::array::from_fn(|v| {
                // HF rescales in f64 and casts to f32, then normalises in f32.
                let x = match self.rescale_factor {
                    Some(f) => (v as f64 * f) as f32,
                    None => v as f32,
                };
                (x - mean) / std
            })
        });
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let (r, rest) = out[start..].split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = luts[0][px[0] as usize];
            g[i] = luts[1][px[1] as usize];
            b[i] = luts[2][px[2] as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_layouts() {
        let new = r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
            "do_normalize": true, "do_resize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
            "image_processor_type": "CLIPImageProcessor"}"#;
        let p = ClipImageProcessor::from_json(new).unwrap();
        assert_eq!(p, ClipImageProcessor::for_image_size(224));
        let round = ClipImageProcessor::for_image_size(32);
        assert_eq!(
            ClipImageProcessor::from_json(&round.to_json()).unwrap(),
            round
        );
        let old = r#"{"crop_size": 224, "size": 224, "resample": 3}"#;
        assert_eq!(
            ClipImageProcessor::from_json(old).unwrap().crop,
            Some((224, 224))
        );
    }

    #[test]
    fn output_is_channels_first_and_normalised() {
        let p = ClipImageProcessor::for_image_size(4);
        let img = RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 128]));
        let mut out = Vec::new();
        p.preprocess_into(&img, &mut out);
        assert_eq!(out.len(), 3 * 16);
        assert!((out[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((out[16] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
    }
}
