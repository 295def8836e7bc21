//! systemd socket activation: taking the listening socket a service
//! manager passed (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; see
//! `sd_listen_fds(3)`).
//!
//! The socket's path and mode are then the unit's (`ListenStream=`,
//! `SocketMode=`, `SocketGroup=`); the daemon still checks its runtime
//! directory, still owns its lock and token file, and still takes each
//! peer's credentials from the accepted connection (`SO_PEERCRED`), never
//! from the process that created the socket.
//!
//! Taking ownership of an inherited descriptor is the one step Rust cannot
//! do without `unsafe` (`OwnedFd::from_raw_fd`): the crate `listenfd` does
//! it, after checking that the descriptor is an `AF_UNIX` `SOCK_STREAM`
//! socket and marking it close-on-exec. Everything else is checked here
//! first, more strictly than `listenfd` would: `LISTEN_PID` must be this
//! process (a variable meant for a parent is ignored), exactly one
//! descriptor must be passed, the socket must be listening
//! (`SO_ACCEPTCONN`) and bound to a pathname (never the abstract namespace,
//! where file permissions do not apply). The socket is made non-blocking.
//!
//! `listenfd` removes `LISTEN_PID` and `LISTEN_FDS` from the environment,
//! so a process the daemon starts does not take the socket for its own
//! (`LISTEN_FDNAMES` stays: without `LISTEN_FDS` it names nothing, and
//! removing it ourselves would take `unsafe`). That is why
//! [`listener_from_env`] must run before any other thread exists:
//! changing the environment while another thread reads it is undefined
//! behaviour. keyholed calls it first thing in `main`.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// `LISTEN_PID`: the pid the passed descriptors are meant for.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// `LISTEN_FDS`: how many descriptors were passed, from descriptor 3 on.
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// `LISTEN_FDNAMES`: the names of the passed descriptors (`FileDescriptorName=`).
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// Not systemd's: a first descriptor other than 3, honoured by `listenfd`
/// but refused here.
const ENV_LISTEN_FDS_FIRST_FD: &str = "LISTEN_FDS_FIRST_FD";

/// Why a passed socket cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_PID` is not a number.
    #[error("${name}={value:?} is not a number")]
    NotANumber {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// More than one descriptor was passed; keyhole serves one socket.
    #[error(
        "{count} sockets were passed (LISTEN_FDS={count}); keyhole serves exactly one: give the socket unit one ListenStream="
    )]
    TooMany {
        /// `LISTEN_FDS`.
        count: u32,
    },
    /// `LISTEN_FDS_FIRST_FD` is set: not systemd's protocol.
    #[error(
        "$LISTEN_FDS_FIRST_FD is set; only systemd's protocol (descriptors from 3) is accepted"
    )]
    FirstFd,
    /// The descriptor is not an `AF_UNIX` stream socket (or not a socket).
    #[error("cannot take the passed descriptor 3")]
    NotUnixStream(#[source] io::Error),
    /// The socket is not listening (`SO_ACCEPTCONN` is off).
    #[error("the passed socket is not listening (a ListenStream= socket is)")]
    NotListening,
    /// The socket is unnamed or in the abstract namespace.
    #[error(
        "the passed socket is not bound to a path (abstract and unnamed sockets are refused: file permissions do not apply to them)"
    )]
    NotPathname,
    /// A system call on the socket failed.
    #[error("the passed socket: {op}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The listening socket a service manager passed.
#[derive(Debug)]
pub struct Inherited {
    /// The listener: validated, non-blocking, close-on-exec.
    pub listener: UnixListener,
    /// The path it is bound to.
    pub path: PathBuf,
    /// Its name (`LISTEN_FDNAMES`, from `FileDescriptorName=`), if given.
    pub name: Option<String>,
}

/// The socket passed by socket activation, or `None` when this process was
/// not socket-activated (`LISTEN_PID` unset or another process's,
/// `LISTEN_FDS` unset or 0).
///
/// Must run before any other thread is started (see the module doc): it
/// removes `LISTEN_PID` and `LISTEN_FDS` from the environment.
pub fn listener_from_env() -> Result<Option<Inherited>, ActivationError> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(count) = passed_count(var, std::process::id())? else {
        return Ok(None);
    };
    if count == 0 {
        return Ok(None);
    }
    if count > 1 {
        return Err(ActivationError::TooMany { count });
    }
    let name = std::env::var(ENV_LISTEN_FDNAMES)
        .ok()
        .and_then(|names| names.split(':').next().map(str::to_owned))
        .filter(|name| !name.is_empty());
    let mut fds = listenfd::ListenFd::from_env();
    let listener = match fds.take_unix_listener(0) {
        Ok(Some(listener)) => listener,
        Ok(None) => {
            return Err(ActivationError::NotUnixStream(io::Error::other(
                "no descriptor was passed",
            )));
        }
        Err(err) => return Err(ActivationError::NotUnixStream(err)),
    };
    let listening =
        rustix::net::sockopt::socket_acceptconn(&listener).map_err(|err| ActivationError::Io {
            op: "getsockopt SO_ACCEPTCONN",
            source: err.into(),
        })?;
    if !listening {
        return Err(ActivationError::NotListening);
    }
    let addr = listener
        .local_addr()
        .map_err(|source| ActivationError::Io {
            op: "getsockname",
            source,
        })?;
    let path = addr
        .as_pathname()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or(ActivationError::NotPathname)?
        .to_path_buf();
    listener
        .set_nonblocking(true)
        .map_err(|source| ActivationError::Io {
            op: "make it non-blocking",
            source,
        })?;
    Ok(Some(Inherited {
        listener,
        path,
        name,
    }))
}

/// How many descriptors were passed to the process `pid`, from the
/// environment `var`: `None` when none were meant for it (testable).
fn passed_count(
    var: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> Result<Option<u32>, ActivationError> {
    let number = |name: &'static str, value: String| {
        value
            .trim()
            .parse::<u32>()
            .map_err(|_| ActivationError::NotANumber { name, value })
    };
    let Some(listen_pid) = var(ENV_LISTEN_PID).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if number(ENV_LISTEN_PID, listen_pid)? != pid {
        return Ok(None);
    }
    let Some(count) = var(ENV_LISTEN_FDS).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let count = number(ENV_LISTEN_FDS, count)?;
    if count > 0 && var(ENV_LISTEN_FDS_FIRST_FD).is_some() {
        return Err(ActivationError::FirstFd);
    }
    Ok(Some(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn descriptors_meant_for_another_process_are_ignored() {
        let for_42 = [("LISTEN_PID", "42"), ("LISTEN_FDS", "1")];
        assert_eq!(passed_count(env(&for_42), 42).unwrap(), Some(1));
        assert_eq!(passed_count(env(&for_42), 43).unwrap(), None);
        // No LISTEN_PID: not for us (listenfd alone would take fd 3).
        assert_eq!(passed_count(env(&[("LISTEN_FDS", "1")]), 42).unwrap(), None);
        assert_eq!(
            passed_count(env(&[("LISTEN_PID", "42")]), 42).unwrap(),
            None
        );
        assert_eq!(passed_count(env(&[]), 42).unwrap(), None);
    }

    #[test]
    fn malformed_variables_are_errors_that_name_them() {
        let err = passed_count(env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "x")]), 42).unwrap_err();
        assert_eq!(err.to_string(), "$LISTEN_FDS=\"x\" is not a number");
        let err = passed_count(env(&[("LISTEN_PID", "-1"), ("LISTEN_FDS", "1")]), 42).unwrap_err();
        assert!(err.to_string().contains("LISTEN_PID"), "{err}");
        let err = passed_count(
            env(&[
                ("LISTEN_PID", "42"),
                ("LISTEN_FDS", "1"),
                ("LISTEN_FDS_FIRST_FD", "5"),
            ]),
            42,
        )
        .unwrap_err();
        assert!(matches!(err, ActivationError::FirstFd), "{err:?}");
    }
}
