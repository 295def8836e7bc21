//! The token on disk: the private runtime directory, writing the
//! `session-token` file atomically (daemon) and reading it with permission
//! checks (client).
//!
//! Writing never goes through create-then-chmod: a temp file is created in
//! the same directory with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 from the
//! start, written, fsynced and renamed over the token path. The directory
//! must belong to this uid and grant nothing to group or others.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{TokenFileError, TokenParseError};
use crate::token::SessionToken;

/// Name of the token file inside the runtime directory.
pub const TOKEN_FILE_NAME: &str = "session-token";

/// Largest token file read: 64 hex characters, a newline, and slack so that a
/// longer file is reported as too long rather than silently cut.
const MAX_TOKEN_FILE_LEN: u64 = 256;

/// This process's effective uid.
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> TokenFileError + 'a {
    move |source| TokenFileError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Who may enter the runtime directory besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirPolicy {
    /// Nobody: mode 0700.
    #[default]
    Private,
    /// Members of this group may traverse it: mode 0710, owned by the
    /// group (0700 is accepted too). Execute without read lets a member
    /// open a name it knows (the socket, its own token file) but not list
    /// the directory; without write, it can create, remove or rename
    /// nothing in it, so it cannot replace the socket or a token file.
    Group(u32),
}

/// Creates `dir` with mode 0700 if it is missing (parents with default
/// permissions), then checks it with [`check_private_dir`] and its
/// ancestors with [`check_ancestors`].
pub fn ensure_private_dir(dir: &Path) -> Result<(), TokenFileError> {
    ensure_runtime_dir(dir, DirPolicy::Private)
}

/// [`ensure_private_dir`] under `policy`. For [`DirPolicy::Group`], a
/// directory that is 0700 or 0710 is given to the group with mode 0710
/// (through a descriptor opened without following a symlink, and checked
/// to be ours first); any other mode is refused, as it is by
/// [`check_runtime_dir`].
pub fn ensure_runtime_dir(dir: &Path, policy: DirPolicy) -> Result<(), TokenFileError> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
            }
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io_err(dir, "create directory")(err)),
            }
        }
        Err(err) => return Err(io_err(dir, "stat")(err)),
    }
    if let DirPolicy::Group(gid) = policy {
        share_with_group(dir, gid)?;
    }
    check_runtime_dir(dir, policy)?;
    check_ancestors(dir)
}

/// Gives `dir` (ours, 0700 or 0710) to group `gid` with mode 0710.
fn share_with_group(dir: &Path, gid: u32) -> Result<(), TokenFileError> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| match err {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => TokenFileError::NotADirectory {
            path: dir.to_path_buf(),
        },
        err => io_err(dir, "open")(err.into()),
    })?;
    let meta = rustix::fs::fstat(&fd).map_err(|e| io_err(dir, "stat")(e.into()))?;
    let uid = current_uid();
    if meta.st_uid != uid {
        return Err(TokenFileError::DirWrongOwner {
            path: dir.to_path_buf(),
            owner: meta.st_uid,
            expected: uid,
        });
    }
    let mode = meta.st_mode & 0o7777;
    if mode & !0o010 & 0o7077 != 0 {
        return Err(TokenFileError::DirInsecureMode {
            path: dir.to_path_buf(),
            mode,
        });
    }
    rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(|e| io_err(dir, "give the directory to the socket group")(e.into()))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o710))
        .map_err(|e| io_err(dir, "chmod 0710")(e.into()))?;
    Ok(())
}

/// Refuses a directory whose ancestors another uid could change: every
/// ancestor (up to `/`) must be owned by root or by this uid, and must not
/// be writable by group or others unless it is sticky (as `/tmp` is). With
/// such an ancestor, another user could move the runtime directory aside
/// and put one of their own in its place (the walk OpenSSH's StrictModes
/// makes for `~/.ssh`).
pub fn check_ancestors(dir: &Path) -> Result<(), TokenFileError> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_err(dir, "find the working directory"))?
            .join(dir)
    };
    let uid = current_uid();
    for ancestor in absolute.ancestors().skip(1) {
        let meta = fs::metadata(ancestor).map_err(io_err(ancestor, "stat"))?;
        let mode = meta.mode() & 0o7777;
        let owner = meta.uid();
        let sticky = mode & 0o1000 != 0;
        if (owner != 0 && owner != uid) || (mode & 0o022 != 0 && !sticky) {
            return Err(TokenFileError::AncestorInsecure {
                path: ancestor.to_path_buf(),
                dir: absolute.clone(),
                owner,
                mode,
            });
        }
    }
    Ok(())
}

/// Refuses a directory that is a symlink, is owned by another uid, or has any
/// group/other permission bit.
pub fn check_private_dir(dir: &Path) -> Result<(), TokenFileError> {
    check_runtime_dir(dir, DirPolicy::Private)
}

/// [`check_private_dir`] under `policy`: for [`DirPolicy::Group`], the
/// group's execute bit is allowed too, when the directory belongs to that
/// group (read or write for the group, and any bit for others, are still
/// refused).
pub fn check_runtime_dir(dir: &Path, policy: DirPolicy) -> Result<(), TokenFileError> {
    let meta = fs::symlink_metadata(dir).map_err(io_err(dir, "stat"))?;
    if !meta.file_type().is_dir() {
        return Err(TokenFileError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(TokenFileError::DirWrongOwner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            expected: uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    let allowed = match policy {
        DirPolicy::Group(gid) if meta.gid() == gid => 0o010,
        _ => 0,
    };
    if mode & 0o077 & !allowed != 0 {
        return Err(TokenFileError::DirInsecureMode {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn refuse_symlink(path: &Path) -> Result<(), TokenFileError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(TokenFileError::Symlink {
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err(path, "stat")(err)),
    }
}

/// Refuses a path that exists and is not a regular file (a directory, a
/// FIFO): the rename would fail or replace something that is not ours.
fn refuse_non_file(path: &Path) -> Result<(), TokenFileError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(TokenFileError::NotAFile {
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err(path, "stat")(err)),
    }
}

/// Writes `token` to `path` atomically with mode 0600, replacing any previous
/// file. The parent directory must pass [`check_private_dir`]; a symlink at
/// `path` is refused and left untouched.
pub fn write_token_file(path: &Path, token: &SessionToken) -> Result<(), TokenFileError> {
    write_token_file_with(path, token, DirPolicy::Private, None)
}

/// [`write_token_file`] in a directory that passes [`check_runtime_dir`]
/// under `policy`, owned by `owner` when given (a token file for another
/// uid that the daemon admits: the client refuses a file it does not own).
/// Giving a file away takes root (`CAP_CHOWN`): without it this fails with
/// [`TokenFileError::Io`] whose source is `PermissionDenied`, and nothing is
/// left behind. The temporary file is given to `owner` before it is renamed
/// into place, so the token path never holds a file of the wrong owner.
pub fn write_token_file_with(
    path: &Path,
    token: &SessionToken,
    policy: DirPolicy,
    owner: Option<u32>,
) -> Result<(), TokenFileError> {
    let dir = parent_dir(path);
    check_runtime_dir(dir, policy)?;
    refuse_symlink(path)?;
    refuse_non_file(path)?;

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| TOKEN_FILE_NAME.to_owned());
    let suffix = SessionToken::generate()?.as_bytes()[..4]
        .iter()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    let tmp: PathBuf = dir.join(format!(
        ".{file_name}.{}.{suffix:08x}.tmp",
        std::process::id()
    ));

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        let mut text = Zeroizing::new(String::with_capacity(65));
        text.push_str(&token.to_hex());
        text.push('\n');
        file.write_all(text.as_bytes())
            .map_err(io_err(&tmp, "write"))?;
        if let Some(uid) = owner {
            rustix::fs::fchown(&file, Some(rustix::fs::Uid::from_raw(uid)), None)
                .map_err(|e| io_err(&tmp, "give the token file to its uid")(e.into()))?;
        }
        file.sync_all().map_err(io_err(&tmp, "fsync"))?;
        // Checked again just before the rename: a symlink planted meanwhile
        // is refused, not replaced.
        refuse_symlink(path)?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename"))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a token file as a client does: it must be a regular file owned by
/// this uid, with no group/other permission bits, holding exactly one token
/// (64 lowercase hex characters and an optional newline).
pub fn read_token_file(path: &Path) -> Result<SessionToken, TokenFileError> {
    read_token_file_owned_by(path, current_uid())
}

/// [`read_token_file`] of a file that must be owned by `owner` (a daemon
/// checking the token file it wrote for another uid).
pub fn read_token_file_owned_by(path: &Path, owner: u32) -> Result<SessionToken, TokenFileError> {
    // Non-blocking, so that a FIFO planted at the path cannot hang the
    // open; every check is made with fstat on what was opened.
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(TokenFileError::NotFound {
                path: path.to_path_buf(),
            });
        }
        Err(err) => return Err(io_err(path, "open")(err)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.file_type().is_file() {
        return Err(TokenFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.uid() != owner {
        return Err(TokenFileError::FileWrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: owner,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenFileError::FileInsecureMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut raw = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_FILE_LEN as usize));
    file.take(MAX_TOKEN_FILE_LEN)
        .read_to_end(&mut raw)
        .map_err(io_err(path, "read"))?;
    let malformed = |reason| TokenFileError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&raw).map_err(|e| {
        malformed(TokenParseError::NotHex {
            position: e.valid_up_to(),
        })
    })?;
    SessionToken::from_hex(text).map_err(malformed)
}

/// Removes the token file at `path` only if it still holds `token` (a file
/// another daemon or a person put there is left alone). Returns whether it
/// was removed.
pub fn remove_token_file_if_ours(path: &Path, token: &SessionToken) -> bool {
    remove_token_file_if_holding(path, token, current_uid())
}

/// [`remove_token_file_if_ours`] for a file owned by `owner` (a token file
/// written for another uid with [`write_token_file_with`]).
pub fn remove_token_file_if_holding(path: &Path, token: &SessionToken, owner: u32) -> bool {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => {}
        _ => return false,
    }
    match read_token_file_owned_by(path, owner) {
        Ok(on_disk) if on_disk == *token => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn token_file_is_0600_even_under_umask_000() {
        let dir = private_dir();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let token = SessionToken::generate().unwrap();
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let result = write_token_file(&path, &token);
        rustix::process::umask(old);
        result.unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "token file mode {mode:o}");
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(read_token_file(&path).unwrap(), token);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refused_when_the_directory_grants_group_or_other_bits() {
        for mode in [0o750, 0o705, 0o770, 0o777] {
            let dir = private_dir();
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let path = dir.path().join(TOKEN_FILE_NAME);
            let err = write_token_file(&path, &SessionToken::generate().unwrap()).unwrap_err();
            match &err {
                TokenFileError::DirInsecureMode { path: p, mode: m } => {
                    assert_eq!(p, dir.path());
                    assert_eq!(*m, mode);
                }
                other => panic!("expected DirInsecureMode, got {other:?}"),
            }
            assert!(err.to_string().contains(&dir.path().display().to_string()));
            assert!(!path.exists());
        }
    }

    #[test]
    fn refused_when_the_token_path_is_a_symlink_and_the_target_is_untouched() {
        let dir = private_dir();
        let target = dir.path().join("precious");
        fs::write(&target, b"do not touch").unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = write_token_file(&path, &SessionToken::generate().unwrap()).unwrap_err();
        assert!(
            matches!(err, TokenFileError::Symlink { ref path } if path.ends_with(TOKEN_FILE_NAME)),
            "{err:?}"
        );
        assert_eq!(fs::read(&target).unwrap(), b"do not touch");
        assert!(
            fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn an_existing_token_file_is_replaced_atomically() {
        let dir = private_dir();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let first = SessionToken::generate().unwrap();
        write_token_file(&path, &first).unwrap();
        let inode_before = fs::metadata(&path).unwrap().ino();
        let second = SessionToken::generate().unwrap();
        write_token_file(&path, &second).unwrap();
        // A rename installs a new inode: readers see either the old file or
        // the new one, never a half-written one.
        assert_ne!(fs::metadata(&path).unwrap().ino(), inode_before);
        assert_eq!(read_token_file(&path).unwrap(), second);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_created_0700() {
        let base = private_dir();
        let dir = base.path().join("a/b/keyhole");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let base = private_dir();
        let real = base.path().join("real");
        DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            check_private_dir(&link),
            Err(TokenFileError::NotADirectory { .. })
        ));
    }

    #[test]
    fn client_read_refuses_a_0644_file() {
        let dir = private_dir();
        let path = dir.path().join(TOKEN_FILE_NAME);
        write_token_file(&path, &SessionToken::generate().unwrap()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        match read_token_file(&path) {
            Err(TokenFileError::FileInsecureMode {
                mode: 0o644,
                path: p,
            }) => assert_eq!(p, path),
            other => panic!("expected FileInsecureMode, got {other:?}"),
        }
    }

    #[test]
    fn client_read_distinguishes_each_problem() {
        let dir = private_dir();
        let path = dir.path().join(TOKEN_FILE_NAME);
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::NotFound { .. })
        ));

        let write = |content: &[u8]| {
            let _ = fs::remove_file(&path);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            f.write_all(content).unwrap();
        };
        write(b"");
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::Malformed {
                reason: TokenParseError::WrongLength { len: 0 },
                ..
            })
        ));
        let good = SessionToken::generate().unwrap().to_hex();
        write(format!("{}\n{}\n", &*good, &*good).as_bytes());
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::Malformed {
                reason: TokenParseError::WrongLength { len: 129 },
                ..
            })
        ));
        write(format!("{}Z\n", &good[..63]).as_bytes());
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::Malformed {
                reason: TokenParseError::NotHex { position: 63 },
                ..
            })
        ));
        write(&[0xff; 64]);
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::Malformed {
                reason: TokenParseError::NotHex { position: 0 },
                ..
            })
        ));
        fs::remove_file(&path).unwrap();
        DirBuilder::new().mode(0o700).create(&path).unwrap();
        assert!(matches!(
            read_token_file(&path),
            Err(TokenFileError::NotAFile { .. })
        ));
    }

    #[test]
    fn remove_only_our_own_token_file() {
        let dir = private_dir();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let ours = SessionToken::generate().unwrap();
        write_token_file(&path, &SessionToken::generate().unwrap()).unwrap();
        assert!(!remove_token_file_if_ours(&path, &ours));
        assert!(path.exists());
        write_token_file(&path, &ours).unwrap();
        assert!(remove_token_file_if_ours(&path, &ours));
        assert!(!path.exists());
    }

    #[test]
    fn a_group_policy_gives_the_directory_to_the_group_0710_and_refuses_more() {
        let gid = rustix::process::getegid().as_raw();
        let base = private_dir();
        let dir = base.path().join("shared");
        ensure_runtime_dir(&dir, DirPolicy::Group(gid)).unwrap();
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o710);
        assert_eq!(meta.gid(), gid);
        // The private policy still refuses it: group x is a permission.
        assert!(matches!(
            check_private_dir(&dir),
            Err(TokenFileError::DirInsecureMode { mode: 0o710, .. })
        ));
        // Read or write for the group, or anything for others, is refused
        // under the group policy too, and left as it was.
        for mode in [0o750, 0o730, 0o711, 0o701] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            match ensure_runtime_dir(&dir, DirPolicy::Group(gid)) {
                Err(TokenFileError::DirInsecureMode { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: expected DirInsecureMode, got {other:?}"),
            }
            assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, mode);
        }
        // A token file can be written in a 0710 directory of that group.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o710)).unwrap();
        let path = dir.join(TOKEN_FILE_NAME);
        let token = SessionToken::generate().unwrap();
        write_token_file_with(&path, &token, DirPolicy::Group(gid), None).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), token);
        assert!(matches!(
            write_token_file(&path, &token),
            Err(TokenFileError::DirInsecureMode { .. })
        ));
    }
}
