//! Every `weir` subcommand's `--help` ends with examples, as a Unix tool's manual does; wrong
//! usage goes to stderr with a non-zero exit.

mod common;

use common::*;

/// The subcommands `weir --help` lists (clap's "Commands:" section), `help` aside.
fn subcommands() -> Vec<String> {
    let out = run_ok(weir().arg("--help"));
    let text = String::from_utf8(out.stdout).unwrap();
    let section = text.split("Commands:").nth(1).unwrap_or_else(|| panic!("no Commands: section in weir --help:\n{text}"));
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_subcommand_help_shows_examples() {
    let subs = subcommands();
    for expected in ["run", "list", "savepoint", "stop", "cancel", "checkpoints", "config"] {
        assert!(subs.iter().any(|s| s == expected), "weir --help lists no `{expected}`: {subs:?}");
    }
    for sub in &subs {
        let out = run_ok(weir().args([sub, "--help"]));
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("Examples:"), "weir {sub} --help has no Examples: section:\n{help}");
        let examples = help.split("Examples:").nth(1).unwrap();
        assert!(examples.contains(&format!("weir {sub}")), "weir {sub} --help: its examples do not show `weir {sub}`:\n{help}");
    }
}

#[test]
fn usage_errors_go_to_stderr_with_a_non_zero_exit() {
    let out = weir().args(["savepoint"]).output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<JOB>"), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}
