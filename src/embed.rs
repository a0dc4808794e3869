//! The Python worker package, embedded in the library and written at run time to a
//! content-addressed cache folder that goes on the workers' `PYTHONPATH`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::python::Interpreter;

/// The package's files, relative to the folder that goes on `PYTHONPATH`.
const FILES: &[(&str, &str)] = &[
    ("snakepit/__init__.py", include_str!("../python/snakepit/__init__.py")),
    ("snakepit/__main__.py", include_str!("../python/snakepit/__main__.py")),
    ("snakepit/protocol.py", include_str!("../python/snakepit/protocol.py")),
    ("snakepit/worker.py", include_str!("../python/snakepit/worker.py")),
    ("snakepit/_logbridge.py", include_str!("../python/snakepit/_logbridge.py")),
    ("snakepit/_keeper.py", include_str!("../python/snakepit/_keeper.py")),
    ("snakepit/_sessions.py", include_str!("../python/snakepit/_sessions.py")),
    ("snakepit/_calls.py", include_str!("../python/snakepit/_calls.py")),
    ("snakepit/_values.py", include_str!("../python/snakepit/_values.py")),
    ("snakepit/demo.py", include_str!("../python/snakepit/demo.py")),
];

/// Returns the folder holding the embedded package, writing it on first use. The folder's name
/// is a hash of the contents, so different versions of the library never share one, and a
/// complete folder is never rewritten.
pub(crate) fn package_dir() -> io::Result<PathBuf> {
    static DIR: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut slot = DIR.get_or_init(Default::default).lock();
    if let Some(dir) = slot.as_ref() {
        if dir.join(FILES[0].0).is_file() {
            return Ok(dir.clone());
        }
    }
    let dir = cache_root().join(format!("py-{:016x}", content_hash()));
    if !dir.join(FILES[0].0).is_file() {
        write_atomically(&dir)?;
    }
    *slot = Some(dir.clone());
    Ok(dir)
}

/// Compiles the package's bytecode for `python` unless it is there already, so workers do not
/// compile it at every start (with `PYTHONDONTWRITEBYTECODE` set they would, ~5 ms each).
/// Best effort: on failure workers still start, only slower.
pub(crate) fn precompile(python: &Interpreter, dir: &Path) {
    if python.cache_tag.is_empty() {
        return;
    }
    let marker = dir.join("snakepit").join("__pycache__").join(format!("worker.{}.pyc", python.cache_tag));
    if marker.is_file() {
        return;
    }
    let script = "import compileall, sys; sys.exit(not compileall.compile_dir(sys.argv[1], quiet=2))";
    let timeout = std::time::Duration::from_secs(20);
    if let Err(why) = crate::python::run_script(&python.executable, script, &[dir.as_os_str()], timeout) {
        log::debug!("could not precompile {}: {why}", dir.display());
    }
}

/// `$XDG_CACHE_HOME/snakepit`, else `~/.cache/snakepit`, else a per-user temp folder.
fn cache_root() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("snakepit");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join(".cache").join("snakepit");
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".to_string());
    std::env::temp_dir().join(format!("snakepit-{user}"))
}

/// FNV-1a over every file's name and contents.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in FILES {
        for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Writes the files into a fresh sibling folder and renames it into place, so a reader never
/// sees half a package even when several processes start pools at once.
fn write_atomically(dir: &Path) -> io::Result<()> {
    let parent = dir.parent().expect("cache folder has a parent");
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    for (name, text) in FILES {
        let path = tmp.join(name);
        fs::create_dir_all(path.parent().expect("file has a parent"))?;
        fs::write(&path, text)?;
    }
    match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process won the race: its folder is complete, ours is not needed.
        Err(_) if dir.join(FILES[0].0).is_file() => fs::remove_dir_all(&tmp),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_of_the_package_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/python/snakepit");
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".py") {
                let path = format!("snakepit/{name}");
                assert!(FILES.iter().any(|(f, _)| *f == path), "{path} is not in embed::FILES");
            }
        }
    }

    #[test]
    fn package_is_written_once_with_every_file() {
        let dir = package_dir().unwrap();
        for (name, text) in FILES {
            assert_eq!(fs::read_to_string(dir.join(name)).unwrap(), *text);
        }
        assert_eq!(package_dir().unwrap(), dir);
        assert!(dir.file_name().unwrap().to_string_lossy().starts_with("py-"));
    }

    #[test]
    fn precompile_writes_bytecode_for_the_interpreter() {
        let dir = package_dir().unwrap();
        let python = crate::python::resolve(Some(Path::new("python3"))).unwrap();
        precompile(&python, &dir);
        let pyc = dir.join("snakepit").join("__pycache__").join(format!("worker.{}.pyc", python.cache_tag));
        assert!(pyc.is_file(), "{}", pyc.display());
    }

    #[test]
    fn hash_depends_on_contents() {
        assert_ne!(content_hash(), 0xcbf2_9ce4_8422_2325);
    }
}
