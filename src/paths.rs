//! Where the socket, the token file and the lock file live, and the
//! environment variables that move them.
//!
//! Runtime directory: `$KEYHOLE_DIR`, else `$XDG_RUNTIME_DIR/keyhole`, else
//! `~/.keyhole`. In it: `keyhole.sock`, `session-token`, `keyholed.lock`.
//! Sockets are always pathname sockets, never the abstract namespace, where
//! file permissions do not apply.

use std::path::{Path, PathBuf};

use crate::token_file::TOKEN_FILE_NAME;

/// Overrides the runtime directory.
pub const ENV_DIR: &str = "KEYHOLE_DIR";
/// Overrides the socket path (client).
pub const ENV_SOCKET: &str = "KEYHOLE_SOCKET";
/// Supplies the token as 64 hex characters (client; forwarded sockets).
pub const ENV_TOKEN: &str = "KEYHOLE_TOKEN";
/// Overrides the token file path (client).
pub const ENV_TOKEN_FILE: &str = "KEYHOLE_TOKEN_FILE";

/// The uid the daemon must run as (client; default: the client's own uid).
/// For clients admitted with `keyholed --allow-uid`.
pub const ENV_DAEMON_UID: &str = "KEYHOLE_DAEMON_UID";

/// Socket file name inside the runtime directory.
pub const SOCKET_FILE_NAME: &str = "keyhole.sock";
/// Lock file name inside the runtime directory.
pub const LOCK_FILE_NAME: &str = "keyholed.lock";

/// The paths one daemon uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePaths {
    /// The private runtime directory (0700, owned by the user).
    pub dir: PathBuf,
    /// The listening socket.
    pub socket: PathBuf,
    /// The token file.
    pub token: PathBuf,
    /// The lock file that keeps a second daemon out.
    pub lock: PathBuf,
}

impl RuntimePaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            socket: dir.join(SOCKET_FILE_NAME),
            token: dir.join(TOKEN_FILE_NAME),
            lock: dir.join(LOCK_FILE_NAME),
            dir,
        }
    }

    /// The runtime directory from the environment, or `None` when none of
    /// `KEYHOLE_DIR`, `XDG_RUNTIME_DIR` and `HOME` is set.
    pub fn default_dir() -> Option<PathBuf> {
        default_dir_from(|name| std::env::var_os(name))
    }

    /// [`Self::in_dir`] of [`Self::default_dir`].
    pub fn from_env() -> Option<Self> {
        Self::default_dir().map(Self::in_dir)
    }
}

/// [`RuntimePaths::default_dir`] with the environment passed in (testable).
pub fn default_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let non_empty = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty(ENV_DIR)
        .or_else(|| non_empty("XDG_RUNTIME_DIR").map(|d| d.join("keyhole")))
        .or_else(|| non_empty("HOME").map(|h| h.join(".keyhole")))
}

/// Whether `path` can name a pathname socket: non-empty, no NUL byte, and
/// not starting with NUL (the abstract namespace).
pub fn is_pathname(path: &Path) -> bool {
    let bytes = path.as_os_str().as_encoded_bytes();
    !bytes.is_empty() && !bytes.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn precedence_keyhole_dir_then_xdg_then_home() {
        let all = [
            ("KEYHOLE_DIR", "/k"),
            ("XDG_RUNTIME_DIR", "/run/user/1"),
            ("HOME", "/h"),
        ];
        assert_eq!(default_dir_from(env(&all)), Some(PathBuf::from("/k")));
        assert_eq!(
            default_dir_from(env(&all[1..])),
            Some(PathBuf::from("/run/user/1/keyhole"))
        );
        assert_eq!(
            default_dir_from(env(&all[2..])),
            Some(PathBuf::from("/h/.keyhole"))
        );
        assert_eq!(
            default_dir_from(env(&[("KEYHOLE_DIR", ""), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.keyhole"))
        );
        assert_eq!(default_dir_from(env(&[])), None);
    }

    #[test]
    fn file_names() {
        let p = RuntimePaths::in_dir("/d");
        assert_eq!(p.socket, PathBuf::from("/d/keyhole.sock"));
        assert_eq!(p.token, PathBuf::from("/d/session-token"));
        assert_eq!(p.lock, PathBuf::from("/d/keyholed.lock"));
    }
}
