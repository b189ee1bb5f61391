//! The configuration's reference (`docs/config.md`) and every TOML example the project's
//! documents show are what the parser accepts; parse errors name their line.

use super::{Config, FileConfig, Overrides};

/// The TOML blocks of `docs/config.md` (the reference), the README and ARCHITECTURE.
fn documented_toml() -> Vec<(&'static str, String)> {
    let docs = [
        ("docs/config.md", include_str!("../../../docs/config.md")),
        ("README.md", include_str!("../../../README.md")),
        ("ARCHITECTURE.md", include_str!("../../../ARCHITECTURE.md")),
    ];
    let mut blocks = Vec::new();
    for (name, text) in docs {
        let mut rest = text;
        while let Some(start) = rest.find("```toml\n") {
            let body = &rest[start + 8..];
            let end = body.find("```").expect("closed block");
            blocks.push((name, body[..end].to_owned()));
            rest = &body[end + 3..];
        }
    }
    blocks
}

#[test]
fn the_reference_parses() {
    let blocks = documented_toml();
    assert!(
        blocks.iter().any(|(name, _)| *name == "docs/config.md"),
        "docs/config.md has no example"
    );
    for (name, block) in blocks {
        let file = FileConfig::parse(&block)
            .unwrap_or_else(|(line, err)| panic!("{name}, block line {line}: {err}"));
        Config::build(file, Overrides::default()).unwrap_or_else(|err| panic!("{name}: {err}"));
    }
}

#[test]
fn parse_errors_carry_the_line() {
    let text = "drain_interval = \"1s\"\n\n[offcpu]\nstack_threshold = 5\n";
    let (line, message) = FileConfig::parse(text).expect_err("a number is no duration");
    assert_eq!(line, 4, "{message}");
    let (line, message) =
        FileConfig::parse("[oncpu]\nfrequency_hz = 49\nbogus = 1\n").expect_err("unknown key");
    assert_eq!(line, 3, "{message}");
    assert!(message.contains("bogus"), "{message}");
}
