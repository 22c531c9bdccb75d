//! The documentation agrees with the code: README.md's flags table is the one `-help` describes,
//! and docs/operating.md names every metric the sidecar exposes and quotes its real error
//! messages in the troubleshooting table. `UPDATE_README=1 cargo test --release --test it
//! flags_table` rewrites the flags table from the CLI definition.

use std::path::PathBuf;

use clap::CommandFactory;
use sidecar::cli::Args;

const BEGIN: &str = "<!-- flags:begin (generated from -help by tests/it/readme.rs) -->";
const END: &str = "<!-- flags:end -->";

/// A file of the repository, by its path from the repository root.
fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn readme_path() -> PathBuf {
    repo_file("README.md")
}

/// Where the metrics list and the troubleshooting table live.
fn operating_doc() -> String {
    std::fs::read_to_string(repo_file("docs/operating.md")).expect("docs/operating.md")
}

/// One row per visible flag, from the same definition `-help` prints.
fn flags_table() -> String {
    let mut table = String::from("| Flag | Default | Meaning |\n|---|---|---|\n");
    for arg in Args::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || long == "help" || long == "version" {
            continue;
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let mut default = match defaults.join(",") {
            d if d.is_empty() => "none".to_string(),
            d => format!("`{d}`"),
        };
        if let Some(env) = arg.get_env() {
            default.push_str(&format!(" (env `{}`)", env.to_string_lossy()));
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        table.push_str(&format!(
            "| `-{long}` | {default} | {} |\n",
            help.replace('|', "\\|")
        ));
    }
    table
}

#[test]
fn the_readme_flags_table_matches_help() {
    let path = readme_path();
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let start = readme.find(BEGIN).expect("flags:begin marker") + BEGIN.len();
    let end = readme.find(END).expect("flags:end marker");
    let current = readme[start..end].trim();
    let wanted = flags_table();
    if current == wanted.trim() {
        return;
    }
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}\n{}{}", &readme[..start], wanted, &readme[end..]);
        std::fs::write(&path, updated).expect("write README.md");
        return;
    }
    panic!(
        "README flags table is stale; run UPDATE_README=1 cargo test --release --test it flags_table.\n\
         Expected:\n{wanted}"
    );
}

#[test]
fn the_operating_doc_lists_every_metric() {
    let doc = operating_doc();
    for name in sidecar::observe::metrics::NAMES {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/operating.md does not document {name}"
        );
    }
}

#[test]
fn the_operating_doc_troubleshooting_quotes_real_error_messages() {
    use sidecar::error::ProxyError;
    let doc = operating_doc();
    // Variable parts are '#' or digits; the longest fixed part must be quoted.
    let p = || "#".to_string();
    let d = || "#".to_string();
    // The fixed part of each message (before its details) must appear verbatim.
    let messages = [
        ProxyError::InvalidJson(String::new()).to_string(),
        ProxyError::NotAnObject.to_string(),
        ProxyError::BodyTooLarge { limit: 0 }.to_string(),
        ProxyError::BadPrefillerHeader(String::new()).to_string(),
        ProxyError::PrefillUnreachable {
            prefiller: p(),
            detail: String::new(),
        }
        .to_string(),
        ProxyError::PrefillFailed {
            prefiller: p(),
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            detail: String::new(),
        }
        .to_string(),
        ProxyError::PrefillBadReply {
            prefiller: p(),
            detail: String::new(),
        }
        .to_string(),
        ProxyError::DecoderUnreachable {
            decoder: d(),
            detail: String::new(),
        }
        .to_string(),
    ];
    for message in messages {
        let fixed = message
            .split(|c: char| c == '#' || c.is_ascii_digit())
            .map(|s| s.trim().trim_end_matches(':').trim())
            .max_by_key(|s| s.len())
            .unwrap_or_default()
            .to_string();
        assert!(
            doc.contains(&fixed),
            "docs/operating.md troubleshooting does not quote {fixed:?} (from {message:?})"
        );
    }
}
