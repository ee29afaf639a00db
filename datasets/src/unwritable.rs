//! Telling a full, read-only or forbidden file system apart from other I/O failures: every
//! later write to the same place fails the same way, so stages stop and say what to do
//! instead of retrying or moving on to the next shard.

/// Why an output cannot be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwritable {
    /// No space left on the device, or the user's quota is used up.
    Full,
    /// A read-only file system.
    ReadOnly,
    /// Permission denied.
    Denied,
}

impl Unwritable {
    /// The problem an I/O error reports, if it is one of these.
    pub fn of_io(e: &std::io::Error) -> Option<Self> {
        match e.raw_os_error()? {
            28 | 122 => Some(Self::Full), // ENOSPC, EDQUOT
            30 => Some(Self::ReadOnly),   // EROFS
            1 | 13 => Some(Self::Denied), // EPERM, EACCES
            _ => None,
        }
    }

    /// The problem somewhere in `e`'s chain of causes, with the operating system's words.
    /// Lance and object_store sometimes keep only an I/O error's text, so the `(os error
    /// N)` it ends with is read too.
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<(Self, String)> {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(found) = c.downcast_ref::<std::io::Error>().and_then(Self::of_io) {
                return Some((found, c.to_string()));
            }
            cause = c.source();
        }
        let text = e.to_string();
        let at = text.find("(os error ")?;
        let code: i32 = text[at + 10..].split(')').next()?.parse().ok()?;
        let found = Self::of_io(&std::io::Error::from_raw_os_error(code))?;
        let start = text[..at].rfind(": ").map_or(0, |i| i + 2);
        let words = text[start..at].rsplit(", ").next().unwrap_or_default();
        Some((found, format!("{}(os error {code})", words.trim_start())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_through_a_chain_of_causes_and_in_text() {
        let io = std::io::Error::from_raw_os_error(28);
        let wrapped = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io),
        };
        let (found, words) = Unwritable::find(&wrapped).unwrap();
        assert_eq!(found, Unwritable::Full);
        assert!(words.contains("os error 28"), "{words}");
        let text = std::io::Error::other(
            "LanceError(IO): Read-only file system (os error 30), /src/lance/commit.rs:12:3",
        );
        let (found, words) = Unwritable::find(&text).unwrap();
        assert_eq!(found, Unwritable::ReadOnly);
        assert_eq!(words, "Read-only file system (os error 30)");
        assert_eq!(
            Unwritable::find(&std::io::Error::from_raw_os_error(13)).map(|f| f.0),
            Some(Unwritable::Denied)
        );
        let other = std::io::Error::from_raw_os_error(104); // ECONNRESET
        assert!(Unwritable::find(&other).is_none());
    }
}
