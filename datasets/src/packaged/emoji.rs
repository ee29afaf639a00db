//! The three emoji sets with captions: Twemoji (`emoji-datasource-twitter`), OpenMoji and
//! Microsoft's Fluent 3D emoji (`@lobehub/fluent-emoji-3d`). Every record is keyed by its
//! code points in lower case (`1f600`, `1f44b-1f3fb`), the same key in every set, so the
//! held-out split treats one emoji the same in all of them.
//!
//! Captions:
//! - Twemoji and Fluent 3D: the emoji's CLDR name (from OpenMoji's `data/openmoji.csv`,
//!   where it has the code point: "red heart"), then its Unicode name and short names from
//!   the `emoji-datasource` `emoji.json` ("heavy black heart, heart"), lower-cased, with the
//!   skin tone of a skin variation. The CLDR name is what people type; the Unicode name
//!   alone is sometimes misleading (U+2764 is drawn red);
//! - OpenMoji: its CLDR annotation and tags from `data/openmoji.csv`.

use super::{Candidate, Rejected};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// One entry of `emoji.json` (the fields captions use).
#[derive(Debug, Deserialize)]
struct EmojiEntry {
    name: Option<String>,
    image: String,
    #[serde(default)]
    short_names: Vec<String>,
    #[serde(default)]
    has_img_twitter: bool,
    #[serde(default)]
    skin_variations: BTreeMap<String, SkinVariation>,
}

#[derive(Debug, Deserialize)]
struct SkinVariation {
    image: String,
    #[serde(default)]
    has_img_twitter: bool,
}

/// A caption for each image stem of `emoji.json`, and whether Twemoji draws it.
#[derive(Debug, Default)]
pub(super) struct EmojiNames {
    /// Image stem (`1f44b-1f3fb`) → (caption, has a Twemoji image).
    pub by_stem: HashMap<String, (String, bool)>,
}

/// The skin-tone modifiers' names (Unicode's Fitzpatrick modifiers).
fn tone_name(code: &str) -> Option<&'static str> {
    Some(match code.to_ascii_uppercase().as_str() {
        "1F3FB" => "light skin tone",
        "1F3FC" => "medium-light skin tone",
        "1F3FD" => "medium skin tone",
        "1F3FE" => "medium-dark skin tone",
        "1F3FF" => "dark skin tone",
        _ => return None,
    })
}

/// `a_b` → `a b`, lower case, trimmed.
fn words(s: &str) -> String {
    s.replace(['_', '-'], " ").trim().to_lowercase()
}

/// The stem of an image file name: `1F600.png` → `1f600`.
pub(super) fn stem(file: &str) -> String {
    crate::split::key_stem(file)
}

/// CLDR annotations and tags by code points (`openmoji.csv`).
#[derive(Debug, Default)]
pub(super) struct Cldr {
    /// Normalised code points ([`cldr_key`]) → (annotation, tags).
    by_code: HashMap<String, (String, Vec<String>)>,
}

/// Code points compared without case, padding or variation selector:
/// `2764-FE0F` and `2764` are one emoji.
fn cldr_key(code_points: &str) -> String {
    code_points
        .split(['-', '_'])
        .filter(|c| !c.eq_ignore_ascii_case("fe0f"))
        .map(|c| format!("{:0>4}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join("-")
}

impl Cldr {
    /// Parses `openmoji.csv` (columns `hexcode`, `annotation`, `tags`).
    pub fn parse(csv: &str) -> Result<Self, String> {
        let rows = parse_csv(csv);
        let header = rows.first().ok_or("openmoji.csv is empty")?;
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| format!("openmoji.csv has no `{name}` column"))
        };
        let (hex, annotation, tags) = (col("hexcode")?, col("annotation")?, col("tags")?);
        let mut by_code = HashMap::new();
        for row in &rows[1..] {
            let get = |i: usize| row.get(i).map(String::as_str).unwrap_or_default();
            let tags = get(tags)
                .split(',')
                .map(words)
                .filter(|t| !t.is_empty())
                .collect();
            by_code.insert(cldr_key(get(hex)), (words(get(annotation)), tags));
        }
        Ok(Self { by_code })
    }

    /// The annotation and tags of the emoji with these code points.
    fn get(&self, code_points: &str) -> Option<&(String, Vec<String>)> {
        self.by_code
            .get(&cldr_key(code_points))
            .filter(|(a, _)| !a.is_empty())
    }
}

/// `parts` joined with commas, each left out when its words are all in the text already.
fn join_new(parts: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for p in parts {
        let seen = |w: &str| out.split([' ', ',', ':']).any(|x| x == w);
        if p.is_empty() || p.split(' ').all(seen) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&p);
    }
    out
}

impl EmojiNames {
    /// Parses `emoji.json`, naming each emoji first by its CLDR name where `cldr` has it.
    pub fn parse(json: &[u8], cldr: &Cldr) -> Result<Self, String> {
        let entries: Vec<EmojiEntry> =
            serde_json::from_slice(json).map_err(|e| format!("emoji.json: {e}"))?;
        let mut by_stem = HashMap::new();
        for e in entries {
            let base = join_new(
                std::iter::once(words(e.name.as_deref().unwrap_or_default()))
                    .chain(e.short_names.iter().map(|s| words(s))),
            );
            let named = |image: &str, fallback: String| match cldr.get(&stem(image)) {
                Some((annotation, _)) => join_new([annotation.clone(), base.clone()]),
                None => fallback,
            };
            by_stem.insert(
                stem(&e.image),
                (named(&e.image, base.clone()), e.has_img_twitter),
            );
            for (codes, v) in &e.skin_variations {
                let tones: Vec<&str> = codes.split('-').filter_map(tone_name).collect();
                let fallback = if tones.is_empty() {
                    base.clone()
                } else {
                    format!("{base}: {}", tones.join(", "))
                };
                by_stem.insert(
                    stem(&v.image),
                    (named(&v.image, fallback), v.has_img_twitter),
                );
            }
        }
        Ok(Self { by_stem })
    }
}

/// Twemoji's 64 px PNGs (`img/twitter/64/<image>`) with their emoji.json captions.
pub(super) fn twitter(
    names: &EmojiNames,
    members: Vec<(String, Vec<u8>)>,
    out: &mut Vec<Candidate>,
    rejected: &mut Vec<Rejected>,
) {
    for (path, bytes) in members {
        let key = stem(&path);
        match names.by_stem.get(&key) {
            Some((caption, _)) => out.push(Candidate::raster(key, caption.clone(), bytes)),
            None => rejected.push(Rejected::new(key, "not named in emoji.json")),
        }
    }
}

/// Fluent 3D's 256 px WebPs (`assets/<code points>.webp`), named through emoji.json.
pub(super) fn fluent(
    names: &EmojiNames,
    members: Vec<(String, Vec<u8>)>,
    out: &mut Vec<Candidate>,
    rejected: &mut Vec<Rejected>,
) {
    for (path, bytes) in members {
        let key = code_points(&stem(&path));
        // Fluent drops the variation selector some emoji.json names keep, and vice versa.
        let caption = names
            .by_stem
            .get(&key)
            .or_else(|| names.by_stem.get(&format!("{key}-fe0f")))
            .or_else(|| names.by_stem.get(&key.replace("-fe0f", "")));
        match caption {
            Some((caption, _)) => out.push(Candidate::raster(key, caption.clone(), bytes)),
            None => rejected.push(Rejected::new(
                key,
                "no emoji.json entry with this code point",
            )),
        }
    }
}

/// Code points as emoji.json writes them: `-`-separated, at least 4 hex digits each
/// (Fluent writes `23-fe0f-20e3` and `1f3f4-e0067_e0062`).
fn code_points(key: &str) -> String {
    key.split(['-', '_'])
        .map(|c| format!("{c:0>4}"))
        .collect::<Vec<_>>()
        .join("-")
}

/// OpenMoji's colour SVGs (`color/svg/<HEXCODE>.svg`) with their CLDR annotation and tags.
pub(super) fn openmoji(
    cldr: &Cldr,
    svgs: Vec<(String, Vec<u8>)>,
    out: &mut Vec<Candidate>,
    rejected: &mut Vec<Rejected>,
) {
    for (path, bytes) in svgs {
        let key = stem(&path);
        match cldr.get(&key) {
            Some((annotation, tags)) => {
                let caption = join_new(std::iter::once(annotation.clone()).chain(tags.clone()));
                out.push(Candidate::svg(key, caption, bytes))
            }
            None => rejected.push(Rejected::new(key, "no annotation in openmoji.csv")),
        }
    }
}

/// RFC 4180 CSV: fields separated by commas, quoted with `"` (doubled inside quotes).
pub(super) fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fluent_code_points_are_padded_and_dashed() {
        assert_eq!(code_points("23-fe0f-20e3"), "0023-fe0f-20e3");
        assert_eq!(code_points("1f3f4-e0067_e0062"), "1f3f4-e0067-e0062");
    }

    #[test]
    fn csv_handles_quotes_and_commas() {
        let rows = parse_csv("a,b,c\n1,\"x, y\",\"say \"\"hi\"\"\"\r\n2,,z");
        assert_eq!(rows[1], vec!["1", "x, y", "say \"hi\""]);
        assert_eq!(rows[2], vec!["2", "", "z"]);
    }

    #[test]
    fn emoji_json_names_skin_variations() {
        let json = br#"[{"name":"WAVING HAND SIGN","image":"1f44b.png","short_names":["wave"],
            "has_img_twitter":true,"skin_variations":{"1F3FB":{"image":"1f44b-1f3fb.png",
            "has_img_twitter":true}}}]"#;
        let n = EmojiNames::parse(json, &Cldr::default()).unwrap();
        assert_eq!(n.by_stem["1f44b"].0, "waving hand sign, wave");
        assert_eq!(
            n.by_stem["1f44b-1f3fb"].0,
            "waving hand sign, wave: light skin tone"
        );
        let cldr = Cldr::parse(
            "hexcode,annotation,tags\n1F44B,waving hand,\"hand, wave\"\n\
             1F44B-1F3FB,waving hand: light skin tone,\n",
        )
        .unwrap();
        let n = EmojiNames::parse(json, &cldr).unwrap();
        assert_eq!(n.by_stem["1f44b"].0, "waving hand, waving hand sign, wave");
        assert_eq!(
            n.by_stem["1f44b-1f3fb"].0,
            "waving hand: light skin tone, waving hand sign, wave"
        );
        assert_eq!(cldr_key("2764-FE0F"), cldr_key("2764"));
    }
}
