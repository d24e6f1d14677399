//! The agent's local socket (`--socket`, default `/run/shoal/shoal.sock`): made private from
//! its first moment, and used only by those allowed, as the docker socket is.
//!
//! - The socket is bound inside a fresh directory only the agent's user can enter, given its
//!   mode there (0600, or 0660 and the `--socket-group` group), and only then renamed to its
//!   path: there is no moment at which it exists at its path with a looser mode.
//! - Every connection's peer credentials (`SO_PEERCRED`) are checked: root, the agent's own
//!   user, or a member of the `--socket-group` group (primary or supplementary). Anyone else
//!   gets a one-line refusal, and is counted. File permissions already keep them out; this is
//!   the second lock, for a socket whose mode someone loosened.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Who may use the socket besides root and the agent's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The agent's effective user.
    pub owner: u32,
    /// The group whose members may use it (`--socket-group`), by name and ID.
    pub group: Option<(String, u32)>,
}

/// A connected client's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its user.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// Its process, if the kernel said.
    pub pid: Option<i32>,
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The `--socket-group` group does not exist.
    #[error("group {0:?} (--socket-group) does not exist; create it (groupadd {0}) or leave the flag out")]
    NoGroup(String),
    /// A file operation failed.
    #[error(
        "cannot make socket {path}: {source}; check --socket and the permissions of its directory"
    )]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl Access {
    /// The access for an agent running as this process's effective user, with `group`.
    pub fn new(group: Option<&str>) -> Result<Self, LocalError> {
        let group = match group {
            None => None,
            Some(name) => {
                let gid = group_id(name)?.ok_or_else(|| LocalError::NoGroup(name.to_owned()))?;
                Some((name.to_owned(), gid))
            }
        };
        Ok(Access {
            owner: effective_uid(),
            group,
        })
    }

    /// Whether `peer` may use the socket. `groups_of` gives a process's supplementary groups
    /// (from `/proc` in production).
    pub fn allows(&self, peer: &Peer, groups_of: impl Fn(i32) -> Vec<u32>) -> bool {
        if peer.uid == 0 || peer.uid == self.owner {
            return true;
        }
        let Some((_, gid)) = &self.group else {
            return false;
        };
        peer.gid == *gid || peer.pid.is_some_and(|pid| groups_of(pid).contains(gid))
    }

    fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// The user this process runs as (effective), from `/proc/self/status`; root if unreadable,
/// which only makes the check stricter (root is allowed anyway).
pub fn effective_uid() -> u32 {
    status_ids("/proc/self/status", "Uid:")
        .and_then(|ids| ids.get(1).copied())
        .unwrap_or(0)
}

/// The supplementary groups of process `pid`, from `/proc/PID/status`.
pub fn groups_of(pid: i32) -> Vec<u32> {
    status_ids(&format!("/proc/{pid}/status"), "Groups:").unwrap_or_default()
}

fn status_ids(path: &str, key: &str) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    Some(
        line.split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect(),
    )
}

/// The ID of group `name`, from `/etc/group`.
pub fn group_id(name: &str) -> Result<Option<u32>, LocalError> {
    let text = std::fs::read_to_string("/etc/group").map_err(|source| LocalError::Io {
        path: "/etc/group".into(),
        source,
    })?;
    Ok(parse_group(&text, name))
}

fn parse_group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Binds the socket at `path` with its final mode (and group) from the start: bound in a
/// private directory next to it, then renamed into place. A stale file at `path` is replaced;
/// the caller has checked no agent answers there.
pub fn bind(path: &Path, access: &Access) -> Result<tokio::net::UnixListener, LocalError> {
    let err = |source| LocalError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(err)?;
    // A directory only we can enter (the mode is set at creation; the umask can only take
    // bits away): nobody can reach the socket inside while its mode is being set.
    let private = parent.join(format!(
        ".shoal-sock-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let result = (|| {
        let inner = private.join("s");
        let listener = tokio::net::UnixListener::bind(&inner)?;
        if let Some((_, gid)) = &access.group {
            std::os::unix::fs::chown(&inner, None, Some(*gid))?;
        }
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(access.mode()))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(group: Option<u32>) -> Access {
        Access {
            owner: 1000,
            group: group.map(|g| ("shoal".to_owned(), g)),
        }
    }

    #[test]
    fn who_may_use_the_socket() {
        let peer = |uid, gid, pid| Peer { uid, gid, pid };
        let none = |_| Vec::new();
        let a = access(None);
        assert!(a.allows(&peer(0, 0, None), none), "root");
        assert!(a.allows(&peer(1000, 1000, None), none), "the agent's user");
        assert!(!a.allows(&peer(1001, 1001, Some(5)), none), "anyone else");
        let g = access(Some(777));
        assert!(g.allows(&peer(1001, 777, None), none), "primary group");
        assert!(
            g.allows(&peer(1001, 1001, Some(5)), |_| vec![10, 777]),
            "supplementary"
        );
        assert!(!g.allows(&peer(1001, 1001, Some(5)), |_| vec![10]));
        assert!(
            !g.allows(&peer(1001, 1001, None), |_| vec![777]),
            "no pid, no lookup"
        );
    }

    #[test]
    fn groups_are_read_from_etc_group_lines() {
        let text = "root:x:0:\nshoal:x:998:alice,bob\nshoalx:x:5:\n";
        assert_eq!(parse_group(text, "shoal"), Some(998));
        assert_eq!(parse_group(text, "root"), Some(0));
        assert_eq!(parse_group(text, "nope"), None);
        assert_eq!(parse_group("broken", "broken"), None);
        assert_eq!(effective_uid(), effective_uid());
        assert!(groups_of(std::process::id() as i32).len() < 1000);
    }

    /// The socket never exists at its path with a mode looser than its final one: a thread
    /// watches the path while the agent binds it, again and again.
    #[tokio::test]
    async fn the_socket_is_private_from_its_first_moment() {
        use std::os::unix::fs::MetadataExt as _;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.sock");
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        seen.insert(m.mode() & 0o777);
                    }
                }
                seen
            })
        };
        let a = access(None);
        for _ in 0..3000 {
            let listener = bind(&path, &a).unwrap();
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        let modes: Vec<String> = seen.iter().map(|m| format!("{m:o}")).collect();
        assert!(
            seen.iter().all(|m| *m == 0o600),
            "modes seen at the socket's path: {modes:?}"
        );
        // Nothing left behind next to it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
