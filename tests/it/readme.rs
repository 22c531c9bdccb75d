//! The documentation agrees with the code: README.md's flags table (the main groups) and
//! docs/flags.md (every group) are what `-help` describes, and docs/operating.md names every
//! metric the sidecar exposes and quotes its real error messages in the troubleshooting table.
//! `UPDATE_README=1 cargo test --release --test it flags_table` rewrites both tables from the
//! CLI definition.

use std::path::PathBuf;

use clap::CommandFactory;
use sidecar::cli::Args;

const BEGIN: &str = "<!-- flags:begin (generated from -help by tests/it/readme.rs) -->";
const END: &str = "<!-- flags:end -->";

/// The groups of `-help` the README shows; docs/flags.md shows them all.
const README_GROUPS: [&str; 3] = ["Serving", "P/D", "TLS"];

/// A file of the repository, by its path from the repository root.
fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Where the metrics list and the troubleshooting table live.
fn operating_doc() -> String {
    std::fs::read_to_string(repo_file("docs/operating.md")).expect("docs/operating.md")
}

/// One row per visible flag of `groups` (all when `None`), under a row naming its group, from
/// the same definition `-help` prints. A help text ending in `[default...: X]` gives the
/// Default column (defaults that depend on the profile have no clap default).
fn flags_table(groups: Option<&[&str]>) -> String {
    let mut table = String::from("| Flag | Default | Meaning |\n|---|---|---|\n");
    let mut group = None;
    for arg in Args::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || long == "help" || long == "version" {
            continue;
        }
        let heading = arg.get_help_heading().unwrap_or("Other");
        if groups.is_some_and(|g| !g.contains(&heading)) {
            continue;
        }
        if group != Some(heading) {
            table.push_str(&format!("| **{heading}** | | |\n"));
            group = Some(heading);
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let mut default = match defaults.join(",") {
            d if d.is_empty() || arg.is_hide_default_value_set() => "none".to_string(),
            d => format!("`{d}`"),
        };
        if let Some(at) = help.rfind(" [default") {
            let stated = help[at..]
                .trim_start_matches(" [")
                .trim_end_matches(']')
                .to_string();
            default = stated
                .split_once(": ")
                .map(|(_, v)| {
                    format!(
                        "`{}`",
                        v.replace(", pd-sidecar: ", "`, pd-sidecar profile: `")
                    )
                })
                .unwrap_or_default();
            help.truncate(at);
        }
        if let Some(env) = arg.get_env() {
            default.push_str(&format!(" (env `{}`)", env.to_string_lossy()));
        }
        let aliases = arg
            .get_visible_aliases()
            .filter(|a| !a.is_empty())
            .map(|a| format!(" (also `-{}`)", a.join("`, `-")))
            .unwrap_or_default();
        table.push_str(&format!(
            "| `-{long}`{aliases} | {default} | {} |\n",
            help.replace('|', "\\|")
        ));
    }
    table
}

/// Checks (or with `UPDATE_README` rewrites) the generated table in `file`.
fn check_table(file: &str, wanted: &str) {
    let path = repo_file(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let start = text.find(BEGIN).expect("flags:begin marker") + BEGIN.len();
    let end = text.find(END).expect("flags:end marker");
    if text[start..end].trim() == wanted.trim() {
        return;
    }
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}\n{}{}", &text[..start], wanted, &text[end..]);
        std::fs::write(&path, updated).expect("write");
        return;
    }
    panic!(
        "{file}'s flags table is stale; run UPDATE_README=1 cargo test --release --test it flags_table.\n\
         Expected:\n{wanted}"
    );
}

#[test]
fn the_readme_flags_table_matches_help() {
    check_table("README.md", &flags_table(Some(&README_GROUPS)));
}

#[test]
fn the_docs_flags_table_matches_help() {
    check_table("docs/flags.md", &flags_table(None));
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
