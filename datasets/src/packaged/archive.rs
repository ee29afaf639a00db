//! Getting a package's files: `npm pack` or `apt-get download` into a cache directory (each
//! skipped when the archive is already there), then reading members of a `.tgz` in memory or
//! unpacking a `.deb` with `dpkg-deb -x`. The registries are the only network access.

use crate::{DatasetError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn failed(package: &str, reason: impl Into<String>) -> DatasetError {
    DatasetError::Package {
        package: package.to_string(),
        reason: reason.into(),
    }
}

/// Runs `cmd` in `dir`; its stderr becomes the error.
fn run(package: &str, dir: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| {
            failed(
                package,
                format!("cannot run `{program}` ({e}); install it (scripts/setup.sh does)"),
            )
        })?;
    if !out.status.success() {
        return Err(failed(
            package,
            format!(
                "`{program} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DatasetError::LocalIo {
        path: dir.to_path_buf(),
        source: e,
    })
}

/// The npm package `name@version` as a `.tgz` in `cache`, packed once.
pub fn npm_pack(name: &str, version: &str, cache: &Path) -> Result<PathBuf> {
    ensure_dir(cache)?;
    // npm names scoped packages `scope-name-version.tgz` without the `@`.
    let file = format!(
        "{}-{version}.tgz",
        name.trim_start_matches('@').replace('/', "-")
    );
    let path = cache.join(&file);
    if path.is_file() {
        return Ok(path);
    }
    let spec = format!("{name}@{version}");
    tracing::info!(package = %spec, "fetching from the npm registry");
    run(&spec, cache, "npm", &["pack", "--silent", &spec])?;
    if !path.is_file() {
        return Err(failed(&spec, format!("npm pack did not write {file}")));
    }
    Ok(path)
}

/// The Debian package `name` as a `.deb` in `cache`, downloaded once.
pub fn apt_download(name: &str, cache: &Path) -> Result<PathBuf> {
    ensure_dir(cache)?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(cache).ok()?.flatten().find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.starts_with(&format!("{name}_")) && n.ends_with(".deb")).then(|| e.path())
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    tracing::info!(package = name, "fetching from Debian");
    run(name, cache, "apt-get", &["download", "-q", name])?;
    find().ok_or_else(|| failed(name, "apt-get download wrote no .deb"))
}

/// Unpacks `deb` into `dir` once (a `.unpacked` marker says it is complete); returns `dir`.
pub fn deb_unpack(deb: &Path, dir: &Path) -> Result<PathBuf> {
    let marker = dir.join(".unpacked");
    if marker.is_file() {
        return Ok(dir.to_path_buf());
    }
    let package = deb.display().to_string();
    let _ = std::fs::remove_dir_all(dir);
    ensure_dir(dir)?;
    let absolute = |p: &Path| {
        std::fs::canonicalize(p).map_err(|e| DatasetError::LocalIo {
            path: p.to_path_buf(),
            source: e,
        })
    };
    let (deb, dir) = (absolute(deb)?, absolute(dir)?);
    let (deb_s, dir_s) = (deb.to_string_lossy(), dir.to_string_lossy());
    run(&package, &dir, "dpkg-deb", &["-x", &deb_s, &dir_s])?;
    std::fs::write(&marker, b"").map_err(|e| DatasetError::LocalIo {
        path: marker,
        source: e,
    })?;
    Ok(dir)
}

/// The members of the gzipped tar `tgz` whose path `wanted` accepts, with their bytes.
pub fn tgz_members(tgz: &Path, wanted: impl Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let package = tgz.display().to_string();
    let file = std::fs::File::open(tgz).map_err(|e| DatasetError::LocalIo {
        path: tgz.to_path_buf(),
        source: e,
    })?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| failed(&package, format!("not a .tgz: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| failed(&package, format!("bad member: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| failed(&package, format!("bad member name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if !wanted(&path) {
            continue;
        }
        let mut data = Vec::with_capacity(entry.header().size().unwrap_or(0) as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| failed(&package, format!("member `{path}` is cut short: {e}")))?;
        out.push((path, data));
    }
    Ok(out)
}
