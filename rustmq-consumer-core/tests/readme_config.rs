//! README.md's table of configuration options is generated from the code: every public field of
//! `ConsumerConfig` (from `src/config.rs`, with its documentation) and its value in
//! `ConsumerConfig::default()`. This test fails, and prints the table to paste, when they differ.

use rustmq_consumer_core::ConsumerConfig;

/// `(field, documentation on one line)` for every public field of `ConsumerConfig`, in order.
fn documented_fields(source: &str) -> Vec<(String, String)> {
    let body = source
        .split("pub struct ConsumerConfig {")
        .nth(1)
        .and_then(|rest| rest.split("\n}").next())
        .expect("ConsumerConfig's definition in config.rs");
    let mut fields = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    for line in body.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
        } else if let Some(field) = line.strip_prefix("pub ") {
            let name = field.split(':').next().unwrap_or_default().trim();
            assert!(!doc.is_empty(), "field {name} has no documentation");
            fields.push((name.to_owned(), doc.join(" ")));
            doc.clear();
        }
    }
    fields
}

/// `(field, value)` from the pretty `Debug` rendering of the default config.
fn default_values() -> Vec<(String, String)> {
    let rendered = format!("{:#?}", ConsumerConfig::default());
    rendered
        .lines()
        .filter_map(|line| line.strip_prefix("    "))
        .map(|line| {
            let (name, value) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("a multi-line default cannot be tabled: {line}"));
            (name.to_owned(), value.trim_end_matches(',').to_owned())
        })
        .collect()
}

/// The table as README.md shows it.
fn table() -> String {
    let docs = documented_fields(include_str!("../src/config.rs"));
    let values = default_values();
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&docs), names(&values), "config.rs and Debug disagree");
    let mut table = String::from("| option | default | meaning |\n|---|---|---|\n");
    for ((name, doc), (_, value)) in docs.iter().zip(&values) {
        let doc = doc.replace('|', "\\|");
        table.push_str(&format!("| `{name}` | `{value}` | {doc} |\n"));
    }
    table
}

#[test]
fn readme_lists_every_option_with_its_default() {
    let table = table();
    assert!(
        table.contains("| `ack_batch_timeout` | `100ms` |"),
        "{table}"
    );
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(&table),
        "README.md's configuration table is out of date; paste this:\n{table}"
    );
}
