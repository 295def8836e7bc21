//! Readiness and status notifications to a service manager (`sd_notify(3)`):
//! `READY=1` once the daemon serves, `STOPPING=1` when it begins to shut
//! down, and `STATUS=` lines that `systemctl status` shows.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the socket named by
//! `$NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace. Written
//! with std's `UnixDatagram` (no `unsafe`, no dependency): the `sd-notify`
//! crate connects to the variable's text as a path, so it cannot reach an
//! abstract socket, which systemd and container managers may pass. Without
//! `$NOTIFY_SOCKET` every call does nothing.
//!
//! The variable is read once, when the [`Notifier`] is made, and left in
//! the environment (removing it would take `unsafe`; a daemon that starts
//! programs should clear it from their environment).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// `NOTIFY_SOCKET`: where the service manager listens.
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A pathname datagram socket.
    Path(PathBuf),
    /// A socket in the abstract namespace (`@name` in `$NOTIFY_SOCKET`),
    /// without the leading NUL byte.
    Abstract(Vec<u8>),
}

impl NotifyTarget {
    /// Parses `$NOTIFY_SOCKET`'s value; `None` for an empty one, or one that
    /// is neither absolute nor `@` (systemd ignores those too).
    pub fn parse(value: &std::ffi::OsStr) -> Option<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        match bytes.first()? {
            b'@' if bytes.len() > 1 => Some(Self::Abstract(bytes[1..].to_vec())),
            b'/' => Some(Self::Path(PathBuf::from(value))),
            _ => None,
        }
    }
}

/// Sends notifications to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<NotifyTarget>,
    stopping: std::sync::Once,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET` (one that does nothing when it is
    /// unset or unusable).
    pub fn from_env() -> Self {
        Self::new(std::env::var_os(ENV_NOTIFY_SOCKET).and_then(|v| NotifyTarget::parse(&v)))
    }

    /// A notifier for `target` (`None`: does nothing).
    pub fn new(target: Option<NotifyTarget>) -> Self {
        Self {
            target,
            stopping: std::sync::Once::new(),
        }
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)))
    }

    /// `STOPPING=1` with a status line, once (later calls do nothing).
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        let mut result = Ok(());
        self.stopping.call_once(|| {
            result = self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
        });
        result
    }

    /// A `STATUS=` line alone.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}\n", one_line(status)))
    }

    /// Sends `message` (`KEY=VALUE` lines) as one datagram.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        let sent = match target {
            NotifyTarget::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifyTarget::Abstract(name) => send_abstract(&socket, name, message.as_bytes())?,
        };
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

/// A status is one line: a newline would start another `KEY=VALUE`.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn notify_socket_values() {
        assert_eq!(
            NotifyTarget::parse(OsStr::new("/run/systemd/notify")),
            Some(NotifyTarget::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyTarget::parse(OsStr::new("@/org/x")),
            Some(NotifyTarget::Abstract(b"/org/x".to_vec()))
        );
        for ignored in ["", "@", "relative/path"] {
            assert_eq!(
                NotifyTarget::parse(OsStr::new(ignored)),
                None,
                "{ignored:?}"
            );
        }
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket_and_stopping_is_sent_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Notifier::new(Some(NotifyTarget::Path(path)));
        notifier.ready("serving\non /x").unwrap();
        assert_eq!(recv(&listener), "READY=1\nSTATUS=serving on /x\n");
        notifier.stopping("stopping").unwrap();
        notifier.stopping("stopping again").unwrap();
        assert_eq!(recv(&listener), "STOPPING=1\nSTATUS=stopping\n");
        let mut buf = [0u8; 64];
        assert_eq!(
            listener.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "STOPPING=1 was sent twice"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("keyhole-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::new(NotifyTarget::parse(OsStr::new(&format!("@{name}"))));
        notifier.status("hello").unwrap();
        assert_eq!(recv(&listener), "STATUS=hello\n");
    }

    #[test]
    fn without_a_manager_nothing_is_sent_and_nothing_fails() {
        let notifier = Notifier::new(None);
        assert!(!notifier.is_enabled());
        notifier.ready("x").unwrap();
    }
}
