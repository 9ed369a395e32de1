//! The bearer token of the mutating endpoints: read from `rest.token-file`, or generated at
//! start and written where only the user can read it (the CLI finds it there by port).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::RestError;

/// Where a generated token for a server on `port` goes: `$HOME/.weir/rest-<port>.token`, or
/// `<temp dir>/weir-<uid>/rest-<port>.token` without a home directory.
pub fn default_token_file(port: u16) -> PathBuf {
    let name = format!("rest-{port}.token");
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".weir").join(name),
        None => std::env::temp_dir().join(format!("weir-{}", uid())).join(name),
    }
}

/// The user id, without libc: the owner of this process's /proc entry.
fn uid() -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata("/proc/self") {
            return m.uid().to_string();
        }
    }
    std::env::var("USER").unwrap_or_else(|_| "user".into())
}

/// The token in `path` (`rest.token-file`): trimmed, and not empty.
pub(crate) fn read_token(path: &Path) -> Result<String, RestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RestError::TokenFile { path: path.to_path_buf(), message: format!("cannot read it: {e}") })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(RestError::TokenFile { path: path.to_path_buf(), message: "it is empty".into() });
    }
    Ok(token.to_string())
}

/// 32 random bytes as 64 hex digits.
pub(crate) fn generate_token() -> Result<String, RestError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| RestError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write `token` to `path`, readable by the user only (file 0600 in a directory 0700).
pub(crate) fn write_token(path: &Path, token: &str) -> Result<(), RestError> {
    let err = |message: String| RestError::TokenWrite { path: path.to_path_buf(), message };
    let dir = path.parent().ok_or_else(|| err("no parent directory".into()))?;
    create_private_dir(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    // Remove first: a new file gets mode 0600 at creation, never a moment with an old mode, and a
    // symlink planted there is not followed.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("cannot replace it: {e}"))),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        // A directory in a shared temp dir could have been made by someone else beforehand.
        let m = std::fs::metadata(dir)?;
        if let Ok(me) = std::fs::metadata("/proc/self") {
            if m.uid() != me.uid() {
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "owned by another user"));
            }
        }
        if m.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}

/// Whether `header` (an `Authorization` value) carries `token`, compared in constant time.
pub(crate) fn bearer_matches(header: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else { return false };
    let given = given.trim_ascii();
    let want = token.as_bytes();
    // The time depends on the lengths only, never on where the first difference is.
    let mut diff = u8::from(given.len() != want.len());
    for (i, w) in want.iter().enumerate() {
        diff |= w ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_needs_the_exact_token() {
        let t = "ab12";
        assert!(bearer_matches(Some(b"Bearer ab12"), t));
        assert!(!bearer_matches(Some(b"Bearer ab13"), t));
        assert!(!bearer_matches(Some(b"Bearer ab1"), t));
        assert!(!bearer_matches(Some(b"Bearer ab123"), t));
        assert!(!bearer_matches(Some(b"ab12"), t));
        assert!(!bearer_matches(None, t));
    }

    #[test]
    fn generated_tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (generate_token().unwrap(), generate_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
