//! A real S3-protocol server on 127.0.0.1 for tests: `s3s-fs` (installed by
//! `scripts/setup.sh --tests` into `.tools/bin`) serving a temporary directory with SigV4
//! authentication.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed on drop.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id it accepts.
    pub access_key: String,
    /// Secret key it accepts.
    pub secret_key: String,
    /// The directory it serves (each subdirectory is a bucket).
    pub root: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with `buckets` created.
    pub fn start(buckets: &[&str]) -> S3Server {
        Self::start_logged(buckets, None)
    }

    /// As `start`, with one log line per request (its S3 operation: `op=GetObject`) written
    /// to `request_log`, so a benchmark can count the requests a stage makes.
    pub fn start_logged(buckets: &[&str], request_log: Option<&std::path::Path>) -> S3Server {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .find(|p| p.join("scripts/setup.sh").is_file())
            .expect("workspace root")
            .to_path_buf();
        let bin = workspace.join(".tools/bin/s3s-fs");
        assert!(
            bin.is_file(),
            "{} is missing: run `bash scripts/setup.sh --tests` (scripts/test.sh does)",
            bin.display()
        );
        let root = tempfile::tempdir().expect("tempdir");
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b)).expect("bucket dir");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let (access_key, secret_key) = (
            "knn-test-key".to_string(),
            "knn-test-secret-0123".to_string(),
        );
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(root.path())
            // s3s-fs logs to stdout.
            .stdout(match request_log {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("request log")),
                None => Stdio::null(),
            })
            .stderr(Stdio::null())
            .env(
                "RUST_LOG",
                if request_log.is_some() {
                    "s3s::ops=debug"
                } else {
                    "off"
                },
            )
            .env("NO_COLOR", "1")
            .spawn()
            .expect("spawn s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            root,
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
