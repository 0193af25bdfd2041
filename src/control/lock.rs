//! One proxy per control socket: an advisory lock (flock) on a file beside
//! the socket, held for the life of the proxy. A second `sluice run` on the
//! same socket is refused, naming the process that holds it; a socket left
//! by a crash is replaced (the kernel let go of the crashed process's lock);
//! a clean exit removes the socket and the lock file.
//!
//! The lock file may be removed by the holder as it exits while another
//! process waits to lock it: after locking, the path is checked to still
//! name the file that was locked, and the lock is taken again if not.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("control socket {socket} is in use by another sluice (pid {pid}; lock {lock}): stop it, or give this one another curtail.socket")]
    Held { socket: String, lock: String, pid: String },
    #[error("control socket lock {lock}: {source}")]
    Io { lock: String, source: std::io::Error },
}

/// The lock on a control socket path; dropping it removes the socket and
/// the lock file.
#[derive(Debug)]
pub struct ControlLock {
    file: File,
    lock: PathBuf,
    socket: PathBuf,
}

/// The lock file of a socket path: `<socket>.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl ControlLock {
    /// Take the lock for `socket`, or say who holds it.
    pub fn acquire(socket: &Path) -> Result<ControlLock, LockError> {
        let lock = lock_path(socket);
        let io = |source| LockError::Io { lock: lock.display().to_string(), source };
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    let pid = match pid.trim() {
                        "" => "unknown".to_owned(),
                        p => p.to_owned(),
                    };
                    return Err(LockError::Held {
                        socket: socket.display().to_string(),
                        lock: lock.display().to_string(),
                        pid,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
            // Still the file at the path? (Its holder may have removed it
            // between our open and our lock.)
            let held = file.metadata().map_err(io)?;
            match std::fs::metadata(&lock) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {}
                _ => continue,
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            writeln!(file, "{}", std::process::id()).map_err(io)?;
            return Ok(ControlLock { file, lock, socket: socket.to_owned() });
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.lock
    }
}

impl Drop for ControlLock {
    fn drop(&mut self) {
        // The socket first (only a socket: never some other file), then the
        // lock file, while the lock is still held; closing the file lets go.
        if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.socket);
        }
        let _ = std::fs::remove_file(&self.lock);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second holder is refused with the first one's pid; once the first
    /// lets go, the lock can be taken again and its file is gone meanwhile.
    #[test]
    fn one_holder_at_a_time_and_the_files_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let first = ControlLock::acquire(&socket).unwrap();
        // flock locks belong to the open file: a second open in this
        // process is refused as another process would be.
        match ControlLock::acquire(&socket) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{other:?}"),
        }
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(socket.exists() && first.path().exists());
        drop(first);
        assert!(!socket.exists(), "the socket goes with the lock");
        assert!(!lock_path(&socket).exists(), "and the lock file");
        let again = ControlLock::acquire(&socket).unwrap();
        assert_eq!(std::fs::read_to_string(again.path()).unwrap().trim(), std::process::id().to_string());
    }

    /// A file at the socket path that is not a socket is never removed.
    #[test]
    fn only_a_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("not-a-socket");
        std::fs::write(&socket, "keep me").unwrap();
        drop(ControlLock::acquire(&socket).unwrap());
        assert_eq!(std::fs::read_to_string(&socket).unwrap(), "keep me");
    }
}
