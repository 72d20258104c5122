//! Async AF_UNIX SOCK_SEQPACKET sockets that carry file descriptors: the transport under ZDS.
//!
//! Input: a socket path. Output: [`SeqpacketListener`] (agent side) and [`SeqpacketConn`] (both sides), whose
//! `send`/`recv` move one whole packet (one protobuf) per call, optionally with SCM_RIGHTS fds.
//! Sockets are created, bound and accepted through `socket2`'s safe API and driven by tokio's [`AsyncFd`];
//! `sendmsg`/`recvmsg` go through `nix`. `unsafe` appears twice: [`recv_once`], where fds the kernel
//! installed for us via SCM_RIGHTS become [`OwnedFd`]s, and [`register`], tokio's registration of an fd. Timeouts are the caller's business (see `zds::IO_TIMEOUT`).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;

/// Pending connections the kernel queues for us. The accept loop is rate limited (5/s, as istio-cni), and
/// at most two proxies connect at a time (rolling update), so a short queue is plenty.
const LISTEN_BACKLOG: i32 = 32;

/// The most fds one message can carry on Linux (`SCM_MAX_FD`). The control buffer has room for all of them
/// in one SCM_RIGHTS header (the kernel merges several into one on receive), so a misbehaving peer can never
/// cause MSG_CTRUNC on fds, and every fd it sent reaches us as an [`OwnedFd`] that is closed when dropped
/// rather than leaking.
const SCM_MAX_FD: usize = 253;

/// Mode of the socket file: owner (root) only. Whoever can connect receives pod network namespaces.
const SOCKET_MODE: u32 = 0o600;

/// Mode for the socket's parent directory when we have to create it.
const DIR_MODE: u32 = 0o755;

/// A listening SOCK_SEQPACKET socket. Dropping it removes the socket file (if it is still ours).
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// Device and inode of the socket file we created, so drop never removes a successor's file.
    file_id: (u64, u64),
}

/// Binds a listener at `path`: creates missing parent directories (mode 0755), removes a stale socket file
/// (refusing to remove anything that is not a socket), and sets the socket file to mode 0600.
pub fn bind(path: &Path) -> io::Result<SeqpacketListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| with_path(e, "creating directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| with_path(e, "removing stale socket", path))?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "inspecting", path)),
    }
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
    socket
        .bind(&SockAddr::unix(path)?)
        .map_err(|e| with_path(e, "binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| with_path(e, "chmod", path))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| with_path(e, "inspecting", path))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(SeqpacketListener {
        fd: register(OwnedFd::from(socket))?,
        path: path.to_path_buf(),
        file_id: (meta.dev(), meta.ino()),
    })
}

impl SeqpacketListener {
    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<SeqpacketConn> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| SockRef::from(fd.get_ref()).accept()) {
                Ok(Ok((socket, _peer))) => {
                    socket.set_nonblocking(true)?;
                    return SeqpacketConn::from_socket(socket);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SeqpacketListener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One connected SOCK_SEQPACKET socket. `send` and `recv` take `&self`; one task should own each direction.
#[derive(Debug)]
pub struct SeqpacketConn {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketConn {
    /// Connects to the listener at `path`. A full accept queue fails with `WouldBlock`; callers retry.
    pub async fn connect(path: &Path) -> io::Result<SeqpacketConn> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        socket
            .connect(&SockAddr::unix(path)?)
            .map_err(|e| with_path(e, "connecting to", path))?;
        SeqpacketConn::from_socket(socket)
    }

    /// A connected pair (for tests and in-process use).
    pub fn pair() -> io::Result<(SeqpacketConn, SeqpacketConn)> {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        Ok((
            SeqpacketConn::from_socket(a)?,
            SeqpacketConn::from_socket(b)?,
        ))
    }

    fn from_socket(socket: Socket) -> io::Result<SeqpacketConn> {
        Ok(SeqpacketConn {
            fd: register(OwnedFd::from(socket))?,
        })
    }

    /// Sends `msg` as one packet, with `fd` as a single SCM_RIGHTS fd when given.
    pub async fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Option<[RawFd; 1]> = fd.map(|f| [f.as_raw_fd()]);
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|sock| {
                let iov = [IoSlice::new(msg)];
                let rights;
                let cmsgs: &[ControlMessage<'_>] = match &fds {
                    Some(raw) => {
                        rights = [ControlMessage::ScmRights(raw)];
                        &rights
                    }
                    None => &[],
                };
                sendmsg::<()>(
                    sock.get_ref().as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(n)) if n == msg.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes", msg.len()),
                    ))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`, with any fds it carried (close-on-exec). `Ok((0, []))` means the peer
    /// closed. A packet longer than `buf` (MSG_TRUNC) or with truncated control data (MSG_CTRUNC) is an
    /// `InvalidData` error; fds received with it are closed.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|sock| recv_once(sock.get_ref().as_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsFd for SeqpacketConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Hands a socket to tokio's reactor. (`AsyncFd::new` is deprecated since tokio 1.52 because it accepts any
/// `AsRawFd`; `register` is its `unsafe` replacement.)
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open fd that only it closes, and its `as_raw_fd` always returns that same fd;
    // the AsyncFd owns it from here until it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// One `recvmsg` call. Takes ownership of every fd that arrives before looking at anything else, so each one
/// is closed on any error path.
#[allow(unsafe_code)]
fn recv_once(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let capacity = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    // `cmsgs()` refuses to parse when MSG_CTRUNC is set; the buffer above holds SCM_MAX_FD fds, so only
    // control messages we never enable (credentials, security labels) could be cut, and they carry no fds.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for raw_fd in raw {
                    // SAFETY: the kernel just installed `raw_fd` in our fd table for this SCM_RIGHTS message
                    // (with O_CLOEXEC); nothing else knows about it, so this OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw_fd) });
                }
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message longer than {} bytes (MSG_TRUNC)", capacity),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (MSG_CTRUNC)",
        ));
    }
    Ok((msg.bytes, fds))
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
