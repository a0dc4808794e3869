//! The README documents every configuration key with its default: checked against the code, so
//! the table cannot drift from it.

use snakepit::POOL_KEYS;

fn expected_table() -> String {
    let mut t = String::from("| key | default | meaning |\n|---|---|---|\n");
    for (key, default, meaning) in POOL_KEYS {
        t.push_str(&format!("| `{key}` | {default} | {meaning} |\n"));
    }
    t
}

#[test]
fn readme_lists_every_configuration_key_with_its_default() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = expected_table();
    assert!(
        readme.contains(&table),
        "README.md must contain this table, generated from POOL_KEYS:\n\n{table}"
    );
}

#[test]
fn every_documented_key_is_accepted_by_the_parser() {
    // A key in the table that the parser rejected would be documentation of nothing.
    for (key, _, _) in POOL_KEYS {
        let value = match *key {
            "name" | "adapter" | "python" => "\"x\"",
            "profile" => "\"process\"",
            "python_path" | "args" => "[]",
            "launcher" => "[\"nice\"]",
            "env" => "{}",
            "jitter" => "0.5",
            "allow_unsafe_threads" | "kill_on_timeout" => "true",
            "max_frame_size" => "\"1MB\"",
            "max_memory" | "max_memory_hard" => "\"2GB\"",
            k if k.ends_with("timeout")
                || k.ends_with("interval")
                || k.ends_with("ttl")
                || k == "session_drain"
                || k == "cancel_grace" =>
            {
                "\"1s\""
            }
            "init" => r#"{"command": "load", "args": {"path": "m.bin"}}"#,
            _ => "3",
        };
        let json = format!(r#"{{"pools": [{{"name": "p", "{key}": {value}}}]}}"#);
        let json = if *key == "name" { r#"{"pools": [{"name": "x"}]}"#.to_string() } else { json };
        snakepit::Config::from_json_str(&json).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}
