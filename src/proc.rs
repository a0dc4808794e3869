//! Reading `/proc`: a process's resident memory and the memory of whole process trees. The one
//! place the crate looks at other processes.

use std::collections::{HashMap, HashSet};

/// The parent of `pid`, from `/proc/<pid>/stat`; `None` if it is gone.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    ppid_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The parent's pid in the text of a `/proc/<pid>/stat`.
fn ppid_in(stat: &str) -> Option<u32> {
    // After the command name (which may hold spaces and parentheses): state, ppid.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of a process, from the `VmRSS` line of `/proc/<pid>/status`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Every process's children, read from `/proc` in one scan; ask it about many trees.
pub(crate) struct ProcessTree {
    children: HashMap<u32, Vec<u32>>,
}

impl ProcessTree {
    /// Scans `/proc` once.
    pub(crate) fn scan() -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
                if let Some(ppid) = ppid_in(&stat) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
        ProcessTree { children }
    }

    /// The memory of a worker's tree, measured from `root`, its keeper (the process the pool
    /// started), without the keeper's own: the worker, its descendants, and the orphans of its
    /// tree that the keeper adopted. `None` if the keeper is gone.
    pub(crate) fn rss_below(&self, root: u32) -> Option<u64> {
        Some(self.rss(root)?.saturating_sub(rss_bytes(root).unwrap_or(0)))
    }

    /// Resident memory of `pid` and all its descendants. `None` if the process is gone.
    pub(crate) fn rss(&self, pid: u32) -> Option<u64> {
        let mut total = rss_bytes(pid)?;
        let mut stack = vec![pid];
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            for &c in self.children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(c) {
                    total += rss_bytes(c).unwrap_or(0);
                    stack.push(c);
                }
            }
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn tree_rss_counts_children() {
        let me = std::process::id();
        let own = rss_bytes(me).unwrap();
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let tree = ProcessTree::scan().rss(me).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree > own, "tree {tree} vs own {own}");
        assert_eq!(ProcessTree::scan().rss(u32::MAX), None);
    }
}
