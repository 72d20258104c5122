//! Network namespaces: opening them, identifying them, and running code inside one.
//!
//! Input: a netns path (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`) or an fd received over ZDS.
//! Output: [`Netns`] handles, and closures run with the calling thread switched into a namespace.
//! Sockets and netlink sockets belong to the namespace of the thread that created them, so creating them
//! inside [`Netns::run`] is how the proxy listens in a pod and how the agent programs a pod's rules.
//! Everything goes through `nix`'s safe `setns`; there is no `unsafe` here.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use nix::sched::{setns, CloneFlags};

/// An open network namespace, with its identity (device and inode of the nsfs file).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
}

/// What makes two handles the same namespace: the nsfs device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// Device of the nsfs mount.
    pub dev: u64,
    /// Inode: unique per namespace while it exists.
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// The magic number of nsfs (`NSFS_MAGIC`), to tell a namespace file from any other file.
const NSFS_MAGIC: i64 = 0x6e73_6673;

impl Netns {
    /// Opens the namespace at `path`, refusing files that are not network namespaces.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening netns {}: {e}", path.display()))
        })?;
        Netns::from_fd(file.into())
            .map_err(|e| io::Error::new(e.kind(), format!("netns {}: {e}", path.display())))
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Wraps an fd (e.g. one received over ZDS), checking that it is a namespace file.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Netns> {
        let fs = nix::sys::statfs::fstatfs(&fd).map_err(io::Error::from)?;
        #[allow(clippy::unnecessary_cast)]
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a namespace file (expected nsfs)",
            ));
        }
        let meta = File::from(fd.try_clone()?).metadata()?;
        Ok(Netns {
            fd,
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// Its identity.
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Another handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<Netns> {
        Ok(Netns {
            fd: self.fd.try_clone()?,
            id: self.id,
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then switches it back to `home`.
    ///
    /// `f` must not block on anything async: the thread is in the pod's namespace while it runs. Use it to
    /// create sockets (they stay in the namespace they were created in). If switching back fails the
    /// process aborts: a thread left in a pod's namespace would carry other pods' traffic there.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("entering {}: {e}", self.id),
            )
        })?;
        let out = f();
        if let Err(e) = setns(home.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "meshnode: FATAL: cannot return to {} from {}: {e}",
                home.id, self.id
            );
            std::process::abort();
        }
        Ok(out)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result. For blocking work
    /// (netlink) that should not tie up an async worker.
    pub fn run_on_thread<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let ns = self.clone();
        std::thread::Builder::new()
            .name("meshnode-netns".into())
            .spawn(move || {
                setns(ns.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("entering {}: {e}", ns.id),
                    )
                })?;
                // The thread ends after `f`, so it never needs to switch back.
                Ok(f())
            })?
            .join()
            .map_err(|_| io::Error::other("thread in network namespace panicked"))?
    }
}

/// A pod's network namespace paired with the proxy's own, so sockets can be created in the pod from any
/// thread (switch in, create, switch back: two `setns` calls, as ztunnel does per socket).
#[derive(Debug)]
pub struct InpodNetns {
    pod: Netns,
    home: Arc<Netns>,
}

impl InpodNetns {
    /// Pairs `pod` with the proxy's namespace `home`.
    pub fn new(pod: Netns, home: Arc<Netns>) -> InpodNetns {
        InpodNetns { pod, home }
    }

    /// The pod's namespace.
    pub fn pod(&self) -> &Netns {
        &self.pod
    }

    /// Runs `f` (synchronous, short: socket creation) inside the pod's namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        self.pod.run(&self.home, f)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Netns> for OwnedFd {
    fn from(ns: Netns) -> OwnedFd {
        ns.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_is_identified_and_entered() {
        let home = Netns::current().unwrap();
        let again = Netns::current().unwrap();
        assert_eq!(home.id(), again.id());
        // Entering our own namespace is allowed for anyone with CAP_SYS_ADMIN; without it setns fails cleanly.
        match home.run(&again, || 42) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert!(e.to_string().contains("entering"), "{e}"),
        }
    }

    #[test]
    fn ordinary_files_are_refused() {
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(err.to_string().contains("not a namespace"), "{err}");
        let err = Netns::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
