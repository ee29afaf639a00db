//! TensorBoard's own reading of an event-file folder (`python/read_tfevents.py` in the
//! project's venv, which `scripts/setup.sh` makes).

use std::path::Path;

/// `{"scalars": {tag: [[step, value], …]}, "images": {tag: [[step, width, height, bytes],
/// …]}}` as TensorBoard's `EventAccumulator` reads `dir`.
pub fn read(dir: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("python/read_tfevents.py"))
        .arg(dir)
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh makes it)");
    assert!(
        out.status.success(),
        "read_tfevents.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_tfevents.py prints JSON")
}
