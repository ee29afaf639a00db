//! Generated inputs for tests: real PNGs with a seed-dependent pattern, a decompression
//! bomb, and WebDataset tar shards.

use std::io::Cursor;

/// A PNG of `w` x `h` whose pixels depend on `seed`.
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(3) ^ seed,
            (y as u8).wrapping_add(seed),
            seed,
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode png");
    out
}

/// A PNG whose header claims `w` x `h` pixels but which holds almost no data: a
/// decompression bomb for any decoder that trusts the header.
pub fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = png(1, 1, 0);
    // IHDR data starts at byte 16: width, height (4 bytes BE each); its CRC follows the 13
    // data bytes and covers the chunk type and data.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// A WebDataset tar of `(member name, bytes)` in order.
pub fn tar(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .expect("append tar member");
    }
    builder.into_inner().expect("finish tar")
}
