//! The README's flags table is the one `-help` describes, and its metrics list names every
//! metric the sidecar exposes. `UPDATE_README=1 cargo test --release --test readme flags` rewrites
//! the flags table from the CLI definition.

use std::path::PathBuf;

use clap::CommandFactory;
use sidecar::cli::Args;

const BEGIN: &str = "<!-- flags:begin (generated from -help by tests/readme.rs) -->";
const END: &str = "<!-- flags:end -->";

fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")
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
        "README flags table is stale; run UPDATE_README=1 cargo test --release --test readme flags.\n\
         Expected:\n{wanted}"
    );
}

#[test]
fn the_readme_lists_every_metric() {
    let readme = std::fs::read_to_string(readme_path()).expect("README.md");
    for name in sidecar::metrics::NAMES {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not document {name}"
        );
    }
}

#[test]
fn the_readme_troubleshooting_quotes_real_error_messages() {
    use sidecar::error::ProxyError;
    let readme = std::fs::read_to_string(readme_path()).expect("README.md");
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
            readme.contains(&fixed),
            "README troubleshooting does not quote {fixed:?} (from {message:?})"
        );
    }
}
