//! TensorBoard event files beside `metrics.jsonl`, so `tensorboard --logdir <output_dir>`
//! shows the loss, learning rate, gradient norm, data wait and images/s over steps, and the
//! sample grids as images.
//!
//! The format is TensorFlow's record file of `Event` protocol buffers
//! (`tensorflow/core/util/event.proto`, `tensorflow/core/framework/summary.proto`): each
//! record is its length (u64, little-endian), the masked CRC-32C of those 8 bytes, the
//! bytes of one `Event`, and their masked CRC-32C (`tensorflow/core/lib/io/record_writer.cc`;
//! mask: rotate right by 15, add `0xa282ead8`). Only the messages written here are declared,
//! with their field numbers from those files; prost encodes them.
//!
//! A run writes its own file,
//! `tensorboard/events.out.tfevents.<unix s>.knn-diffusion.<pid>.<n>`
//! (TensorBoard reads every file of a folder in name order). A resumed run first writes a
//! `SessionLog` START at the step after the one it resumed from: TensorBoard then drops what
//! an earlier run logged past the checkpoint, as `metrics.jsonl` is cut back to it.

use crate::{Result, TrainerError};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Content", tags = "2, 4")]
    content: Option<Content>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Content {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// 1: START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// CRC-32C (Castagnoli, reflected polynomial `0x82f63b78`), bit by bit per byte through a
/// table built once.
fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The CRC TensorFlow's records carry: masked so that a CRC of data holding CRCs stays
/// useful.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its CRC, the data, its CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// One run's event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir` for a run that starts after `resumed_step` (0: a fresh
    /// run).
    pub fn create(dir: &Path, resumed_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // A second run in the same second and process (a test, a resume loop) gets the next
        // number rather than overwriting the first's file.
        let mut n = 0;
        let (path, file) = loop {
            let name = format!(
                "events.out.tfevents.{secs:010}.knn-diffusion.{}.{n:03}",
                std::process::id()
            );
            let path = dir.join(name);
            match std::fs::File::create_new(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 999 => n += 1,
                Err(e) => return Err(TrainerError::io(&path, e)),
            }
        };
        let mut w = Self { path, file };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        if resumed_step > 0 {
            w.write(resumed_step + 1, What::SessionLog(SessionLog { status: 1 }))?;
        }
        Ok(w)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars at `step`, one per `(tag, value)`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| Value {
                tag: tag.clone(),
                content: Some(Content::SimpleValue(*v as f32)),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// The PNG file `path` as an image at `step` under `tag`; its size is read from the
    /// PNG's header.
    pub fn png_file(&mut self, step: u64, tag: &str, path: &Path) -> Result<()> {
        let png = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
        let (width, height) = png_size(&png).ok_or_else(|| {
            let why = std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PNG");
            TrainerError::io(path, why)
        })?;
        let image = Image {
            height,
            width,
            colorspace: 3,
            encoded_image_string: png,
        };
        let value = vec![Value {
            tag: tag.to_string(),
            content: Some(Content::Image(image)),
        }];
        self.write(step, What::Summary(Summary { value }))
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        use prost::Message;
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let event = Event {
            wall_time,
            step: step as i64,
            what: Some(what),
        };
        self.file
            .write_all(&record(&event.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainerError::io(&self.path, e))
    }
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> Option<(i32, i32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| i32::try_from(u32::from_be_bytes(b.try_into().ok()?)).ok();
    Some((be(&png[16..20])?, be(&png[20..24])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn records_frame_their_data() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 3);
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r[15..].to_vec(), masked_crc(b"abc").to_le_bytes().to_vec());
    }

    #[test]
    fn png_size_reads_the_header_and_refuses_other_bytes() {
        let img = image::RgbImage::new(7, 3);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(png_size(&png), Some((7, 3)));
        assert_eq!(png_size(b"GIF89a not a png at all"), None);
    }
}
