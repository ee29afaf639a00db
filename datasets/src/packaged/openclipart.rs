//! Openclipart (Debian `openclipart-png` + `openclipart-svg`, public domain): each PNG under
//! `png/<category>/…/<name>.png` has an SVG twin whose metadata make the caption: its
//! `<dc:title>` and its keywords (`<dc:subject>`'s `<rdf:li>` items).
//!
//! Many titles are not descriptions but collection names shared by hundreds of files
//! ("gramastar", "Part of the Flat Icon Collection …", "Lemon SVG theme"), author credits
//! ("Clipart by Nicu Buculei - fc23") or nothing at all. Such junk titles are dropped: a title
//! is junk when it is empty, has no letters, names a collection, theme or icon set, or is
//! shared by [`COLLECTION_TITLE_FILES`] files or more. Junk keywords (`hash(0x…)`, `unsorted`,
//! file-format words) are dropped too. A record keeps its keywords when its title is junk,
//! and is rejected when fewer than two keywords remain.

use super::{Candidate, Rejected};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Files sharing one title at or above this count make it a collection name, not a caption.
pub const COLLECTION_TITLE_FILES: usize = 8;

/// Keywords that describe nothing.
const JUNK_KEYWORDS: [&str; 16] = [
    "unsorted",
    "icon",
    "icons",
    "theme",
    "clip",
    "art",
    "clipart",
    "svg",
    "png",
    "image",
    "picture",
    "media",
    "openclipart",
    "public",
    "domain",
    "hash",
];

/// Title words that mark a collection, a theme or a credit rather than a description.
const JUNK_TITLE_WORDS: [&str; 7] = [
    "collection",
    "theme",
    "iconset",
    "icons",
    "clipart by",
    "untitled",
    "various cliparts",
];

/// The Dublin Core namespace of `<dc:title>`.
const DUBLIN_CORE: &str = "http://purl.org/dc/elements/1.1/";

/// What one SVG's metadata says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Metadata {
    /// `<dc:title>` of the work (the first one), trimmed.
    pub title: String,
    /// Keywords, in file order.
    pub keywords: Vec<String>,
}

/// Reads the title and keywords of an SVG; `None` when it is not XML.
pub(super) fn metadata(svg: &str) -> Option<Metadata> {
    let doc = roxmltree::Document::parse_with_options(
        svg,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .ok()?;
    let mut m = Metadata::default();
    for node in doc.descendants().filter(|n| n.is_element()) {
        match node.tag_name().name() {
            "title" if m.title.is_empty() && node.tag_name().namespace() == Some(DUBLIN_CORE) => {
                m.title = node.text().unwrap_or_default().trim().to_string();
            }
            "subject" => {
                for li in node.descendants().filter(|n| n.tag_name().name() == "li") {
                    m.keywords
                        .push(li.text().unwrap_or_default().trim().to_string());
                }
            }
            _ => {}
        }
    }
    Some(m)
}

/// Words of a keyword or title: separators to spaces, lower case.
fn words(s: &str) -> String {
    s.replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn good_keyword(k: &str) -> bool {
    !k.is_empty()
        && k.chars().any(char::is_alphabetic)
        && !k.starts_with("0x")
        && !k.starts_with("hash(")
        && !JUNK_KEYWORDS.contains(&k)
}

/// A usable title: credits stripped, junk refused.
fn clean_title(title: &str, shared_by: usize) -> Option<String> {
    let t = words(title);
    // "clipart by nicu buculei - fc23" → "fc23": the part after the credit, if any.
    let t = match t.split_once(" - ") {
        Some((credit, rest)) if credit.starts_with("clipart by") => rest.trim().to_string(),
        _ => t,
    };
    let junk = t.is_empty()
        || !t.chars().any(char::is_alphabetic)
        || shared_by >= COLLECTION_TITLE_FILES
        || JUNK_TITLE_WORDS.iter().any(|w| t.contains(w))
        // A file-name-like title (`fc23`, `star_85pt41step`) says nothing.
        || t.chars().filter(|c| c.is_ascii_digit()).count() * 2 >= t.len();
    (!junk).then_some(t)
}

/// The caption of a file with `meta`, whose title `shared_by` files carry.
pub(super) fn caption(meta: &Metadata, shared_by: usize) -> Result<String, &'static str> {
    let mut parts: Vec<String> = Vec::new();
    let title = clean_title(&meta.title, shared_by);
    if let Some(t) = &title {
        parts.push(t.clone());
    }
    let mut kept = 0;
    for k in meta.keywords.iter().map(|k| words(k)) {
        if good_keyword(&k) && !parts.iter().any(|p| p.split(' ').any(|w| w == k)) && kept < 6 {
            parts.push(k);
            kept += 1;
        }
    }
    if title.is_none() && kept < 2 {
        return Err("junk title and fewer than two keywords");
    }
    Ok(parts.join(", "))
}

fn svg_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            svg_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "svg") {
            out.push(p);
        }
    }
}

/// Candidates from an unpacked `openclipart` tree (`…/usr/share/openclipart/{png,svg}`).
pub(super) fn records(root: &Path, out: &mut Vec<Candidate>, rejected: &mut Vec<Rejected>) {
    let svg_root = root.join("svg");
    let png_root = root.join("png");
    let mut files = Vec::new();
    svg_files(&svg_root, &mut files);
    let metas: Vec<(PathBuf, Option<Metadata>)> = files
        .into_iter()
        .map(|p| {
            let m = std::fs::read_to_string(&p).ok().and_then(|t| metadata(&t));
            (p, m)
        })
        .collect();
    let mut shared: HashMap<String, usize> = HashMap::new();
    for m in metas.iter().filter_map(|(_, m)| m.as_ref()) {
        *shared.entry(words(&m.title)).or_default() += 1;
    }
    for (svg, meta) in metas {
        let rel = svg
            .strip_prefix(&svg_root)
            .unwrap_or(&svg)
            .with_extension("");
        let key = rel.to_string_lossy().replace('\\', "/");
        let Some(meta) = meta else {
            rejected.push(Rejected::new(key, "its SVG twin is not readable XML"));
            continue;
        };
        let cap = match caption(&meta, shared[&words(&meta.title)]) {
            Ok(c) => c,
            Err(why) => {
                rejected.push(Rejected::new(key, why));
                continue;
            }
        };
        // Not `with_extension`: names like `wasp_gerald_g._01` have dots of their own.
        match std::fs::read(png_root.join(format!("{key}.png"))) {
            Ok(bytes) => out.push(Candidate::raster(key, cap, bytes)),
            Err(_) => rejected.push(Rejected::new(key, "no PNG twin")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVG: &str = r#"<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns:cc="http://web.resource.org/cc/">
  <metadata><rdf:RDF><cc:Work>
    <dc:title>Juice Glass</dc:title>
    <dc:subject><rdf:Bag><rdf:li>food</rdf:li><rdf:li>juice</rdf:li><rdf:li>hash(0x86a0bb0)</rdf:li>
      <rdf:li></rdf:li><rdf:li>glass</rdf:li></rdf:Bag></dc:subject>
  </cc:Work></rdf:RDF></metadata>
  <title>not the work's title</title>
</svg>"#;

    #[test]
    fn title_and_keywords_make_the_caption() {
        let m = metadata(SVG).unwrap();
        assert_eq!(m.title, "Juice Glass");
        assert_eq!(caption(&m, 1).unwrap(), "juice glass, food");
    }

    #[test]
    fn junk_titles_are_dropped() {
        let m = Metadata {
            title: "Part of the Flat Icon Collection (Wed Aug 25 2004)".into(),
            keywords: vec!["action".into(), "computer".into(), "icons".into()],
        };
        assert_eq!(caption(&m, 1).unwrap(), "action, computer");
        let shared = Metadata {
            title: "gramastar".into(),
            keywords: vec!["stars".into()],
        };
        assert!(caption(&shared, 1375).is_err());
        let credit = Metadata {
            title: "Clipart by Nicu Buculei - fc23".into(),
            keywords: vec![],
        };
        assert!(caption(&credit, 1).is_err());
    }
}
