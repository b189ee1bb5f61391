//! The configuration's reference (`docs/config.md`) and every TOML example the project's
//! documents show are what the parser accepts; parse errors name their line.

use super::{Config, FileConfig, Overrides, RunConfig, RunOverrides};

/// Level-2 sections of README and ARCHITECTURE about the collector: their TOML blocks
/// are the collector's configuration, which has its own parser. Every other block is the
/// agent's, so a new collector section with a TOML block fails here until it is named.
const COLLECTOR_SECTIONS: [&str; 4] = [
    "## Streaming to a collector",
    "## Degradation windows",
    "## Streaming, storage and query",
    "## Window detection",
];

/// The agent's TOML blocks in `docs/config.md` (the reference), the README and
/// ARCHITECTURE.
fn documented_toml() -> Vec<(&'static str, String)> {
    let docs = [
        ("docs/config.md", include_str!("../../../docs/config.md")),
        ("README.md", include_str!("../../../README.md")),
        ("ARCHITECTURE.md", include_str!("../../../ARCHITECTURE.md")),
    ];
    let mut blocks = Vec::new();
    for (name, text) in docs {
        let mut section = "";
        let mut block: Option<String> = None;
        for line in text.lines() {
            match &mut block {
                None if line.starts_with("## ") => section = line.trim_end(),
                None if line == "```toml" => block = Some(String::new()),
                None => {}
                Some(body) if line.starts_with("```") => {
                    if !COLLECTOR_SECTIONS.contains(&section) {
                        blocks.push((name, std::mem::take(body)));
                    }
                    block = None;
                }
                Some(body) => {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
        assert!(block.is_none(), "{name}: a ```toml block is not closed");
    }
    blocks
}

#[test]
fn the_reference_parses() {
    let blocks = documented_toml();
    for doc in ["docs/config.md", "README.md"] {
        assert!(
            blocks.iter().any(|(name, _)| *name == doc),
            "{doc} has no agent configuration example"
        );
    }
    for (name, block) in blocks {
        let mut file = FileConfig::parse(&block)
            .unwrap_or_else(|(line, err)| panic!("{name}, block line {line}: {err}"));
        let run = std::mem::take(&mut file.run);
        let sampling =
            Config::build(file, Overrides::default()).unwrap_or_else(|err| panic!("{name}: {err}"));
        RunConfig::build(sampling, run, RunOverrides::default())
            .unwrap_or_else(|err| panic!("{name}, [run]: {err}"));
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
