//! A folder named `snakepit` in the current directory must not replace the embedded package.
//! (Its own test binary: it changes the process's current directory.)

mod common;

use serde_json::json;

#[test]
fn the_current_directory_cannot_shadow_the_worker_package() {
    let dir = std::env::temp_dir().join(format!("snakepit-cwd-{}", std::process::id()));
    let fake = dir.join("snakepit");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("__init__.py"), "raise SystemExit('the fake snakepit package was imported')\n")
        .unwrap();
    std::fs::write(fake.join("worker.py"), "raise SystemExit('the fake snakepit package was imported')\n")
        .unwrap();
    std::env::set_current_dir(&dir).unwrap();
    let pool = common::builder(1).build().unwrap();
    assert_eq!(pool.call("add", json!([1, 2])).unwrap(), json!(3));
    pool.shutdown().unwrap();
    std::env::set_current_dir(std::env::temp_dir()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
