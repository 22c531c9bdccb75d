//! Go's flag spelling, rewritten for clap.
//!
//! Go's `flag` package (the Go sidecar, klog) accepts `-name=value`, `-name value`,
//! `--name=value` and bare booleans (`-secure-proxy`, `-secure-proxy=false`); pflag
//! (pd-sidecar, zap) accepts only the double-dash forms. clap wants `--name`, so single-dash
//! long flags are rewritten before clap sees them.

use std::ffi::OsString;

/// Rewrites `-name[=value]` to `--name[=value]`, and `-h`/`-help` to `--help`, up to `--`.
/// The argument after a flag that `takes_value` (written without `=`) is its value, kept as
/// it is even if it starts with a dash (`-max-idle-conns-per-host -1`).
pub fn rewrite<I, T>(args: I, takes_value: impl Fn(&str) -> bool) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut verbatim = false;
    let mut value_next = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        let text = arg.to_str().map(str::to_owned);
        if std::mem::take(&mut value_next) {
            out.push(arg);
            continue;
        }
        if let Some(t) = text
            .as_deref()
            .filter(|t| i > 0 && !verbatim && t.starts_with('-'))
        {
            let name = t.trim_start_matches('-');
            value_next = !name.contains('=') && takes_value(name);
        }
        match text {
            Some(t) if i > 0 && !verbatim && t == "--" => {
                verbatim = true;
                out.push(arg);
            }
            Some(t) if i > 0 && !verbatim && t == "--h" => out.push("--help".into()),
            Some(t)
                if i > 0
                    && !verbatim
                    && t.len() > 1
                    && t.starts_with('-')
                    && !t.starts_with("--") =>
            {
                let body = &t[1..];
                let name = body.split('=').next().unwrap_or(body);
                if name == "h" || name == "help" {
                    out.push("--help".into());
                } else {
                    out.push(format!("-{t}").into());
                }
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> Vec<String> {
        rewrite(std::iter::once("prog").chain(args.iter().copied()), |f| {
            ["port", "v"].contains(&f)
        })
        .into_iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            words(&["-port=1", "-v", "4", "--kv-connector", "nixlv2", "-h"]),
            ["--port=1", "--v", "4", "--kv-connector", "nixlv2", "--help"]
        );
        assert_eq!(words(&["--", "-port"]), ["--", "-port"]);
        assert_eq!(words(&["-port", "-1", "-x"]), ["--port", "-1", "--x"]);
    }
}
