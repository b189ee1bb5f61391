//! The import-cycle check of `cargo xtask lint`: within one crate, modules that are not
//! each other's ancestor must not import each other, directly or through others. Read from
//! the source: the module tree follows `mod NAME;` declarations from each crate root, and
//! an import is any `crate::`, `super::` or `self::` path (in `use` trees or in code) and
//! any `use` of a child module by its bare name. A path is charged to the deepest module
//! it names; a name a module re-exports (`pub use child::Name`) is charged to where it
//! comes from.
//!
//! A child importing its parent's items, or a parent its children's, is not a cycle: a
//! module split into files (one type's `impl` blocks by concern) does exactly that. What
//! counts is the graph between sibling subtrees at every level: `a/x.rs` importing from
//! `b/` is an edge `a -> b` in the graph of their common parent, and a cycle there means
//! neither folder can be understood (or moved) without the other.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// A module's path from its crate root (`[]` is the root itself).
type ModPath = Vec<String>;

/// One module file of a crate.
#[derive(Debug)]
struct Module {
    file: PathBuf,
    /// Names of the child modules it declares (`mod NAME;`).
    children: BTreeSet<String>,
}

/// One import: where it is written and which module it names.
#[derive(Debug, Clone)]
struct Import {
    from: ModPath,
    to: ModPath,
    line: usize,
}

/// The source files under `root`'s crates that are crate roots: `src/lib.rs`,
/// `src/main.rs` and `src/bin/*/main.rs` of every workspace member.
pub fn crate_roots(root: &Path, members: &[&str]) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for member in members {
        let src = root.join(member).join("src");
        for name in ["lib.rs", "main.rs"] {
            if src.join(name).is_file() {
                roots.push(src.join(name));
            }
        }
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            let mut bins: Vec<PathBuf> = bins.flatten().map(|e| e.path()).collect();
            bins.sort();
            for bin in bins {
                if bin.join("main.rs").is_file() {
                    roots.push(bin.join("main.rs"));
                } else if bin.extension().is_some_and(|e| e == "rs") {
                    roots.push(bin);
                }
            }
        }
    }
    roots
}

/// One cycle: the sibling modules that import each other, and a paragraph naming the
/// crate root and the import lines.
#[derive(Debug)]
pub struct Cycle {
    /// Read by the tests; the report names them too.
    #[cfg_attr(not(test), expect(dead_code, reason = "the report says it"))]
    pub modules: BTreeSet<String>,
    pub report: String,
}

/// Checks every crate root; returns the cycles found (empty: none).
pub fn check(roots: &[PathBuf]) -> anyhow::Result<Vec<Cycle>> {
    let mut found = Vec::new();
    for root in roots {
        let modules = module_tree(root)?;
        let mut imports = Vec::new();
        for (path, module) in &modules {
            let text = std::fs::read_to_string(&module.file)
                .with_context(|| format!("reading {}", module.file.display()))?;
            imports.extend(imports_of(path, &text, &modules));
        }
        for (component, text) in cycles(&modules, &imports) {
            found.push(Cycle {
                modules: component,
                report: format!("{}: {text}", root.display()),
            });
        }
    }
    Ok(found)
}

/// The modules of the crate whose root file is `root`, by path.
fn module_tree(root: &Path) -> anyhow::Result<BTreeMap<ModPath, Module>> {
    let mut modules = BTreeMap::new();
    let mut stack = vec![(Vec::new(), root.to_path_buf())];
    while let Some((path, file)) = stack.pop() {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let children = declared_modules(&text);
        // `lib.rs`, `main.rs` and `mod.rs` keep their children beside them; `name.rs`
        // keeps them in `name/`.
        let dir = match file.file_stem().and_then(|s| s.to_str()) {
            Some("lib" | "main" | "mod") => file.parent().map(Path::to_path_buf),
            Some(_) if path.is_empty() => file.parent().map(Path::to_path_buf),
            Some(stem) => file.parent().map(|p| p.join(stem)),
            None => None,
        }
        .unwrap_or_default();
        for child in &children {
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(child).join("mod.rs");
            let child_file = if flat.is_file() { flat } else { nested };
            if child_file.is_file() {
                let mut child_path = path.clone();
                child_path.push(child.clone());
                stack.push((child_path, child_file));
            }
        }
        modules.insert(path, Module { file, children });
    }
    Ok(modules)
}

/// `mod NAME;` declarations (any visibility), outside comments.
fn declared_modules(text: &str) -> BTreeSet<String> {
    code_lines(text)
        .filter_map(|(_, line)| {
            let line = line.trim();
            let rest = strip_visibility(line).strip_prefix("mod ")?;
            let name = rest.strip_suffix(';')?.trim();
            is_ident(name).then(|| name.to_owned())
        })
        .collect()
}

/// Lines with `//` comments removed (block comments and strings are rare enough in the
/// places that matter to be left alone), numbered from 1.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(index, line)| {
        let code = line.find("//").map_or(line, |at| &line[..at]);
        (index + 1, code)
    })
}

fn strip_visibility(line: &str) -> &str {
    let line = line.trim_start();
    if let Some(rest) = line.strip_prefix("pub(")
        && let Some(close) = rest.find(')')
    {
        return rest[close + 1..].trim_start();
    }
    line.strip_prefix("pub ").map_or(line, str::trim_start)
}

fn is_ident(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !word.starts_with(|c: char| c.is_ascii_digit())
}

/// Every import written in module `path` (source `text`).
fn imports_of(path: &ModPath, text: &str, modules: &BTreeMap<ModPath, Module>) -> Vec<Import> {
    let children = modules.get(path).map(|m| &m.children);
    let mut imports = Vec::new();
    // Inline modules (`mod tests {`) open at some indentation and close at the same one;
    // `super::` inside them first climbs out of them.
    let mut inline: Vec<usize> = Vec::new();
    let mut statement = String::new();
    let mut statement_line = 0;
    for (number, line) in code_lines(text) {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if inline.last().is_some_and(|&open| open == indent) && trimmed.starts_with('}') {
            inline.pop();
            continue;
        }
        if let Some(rest) = strip_visibility(trimmed).strip_prefix("mod ")
            && rest.trim_end().ends_with('{')
        {
            inline.push(indent);
            continue;
        }
        let depth = inline.len();
        // `use` statements may span lines: collect them whole.
        if statement.is_empty() && strip_visibility(trimmed).starts_with("use ") {
            statement_line = number;
        }
        if statement_line != 0 {
            statement.push_str(trimmed);
            statement.push(' ');
            if trimmed.ends_with(';') {
                let tree = strip_visibility(&statement)
                    .trim_start_matches("use ")
                    .trim_end()
                    .trim_end_matches(';')
                    .to_owned();
                for used in expand_use_tree(&tree) {
                    let relative_child = used.first().is_some_and(|first| {
                        depth == 0 && children.is_some_and(|c| c.contains(first))
                    });
                    let target = if relative_child {
                        let mut full = path.clone();
                        full.extend(used.iter().cloned());
                        Some(full)
                    } else {
                        absolute(path, depth, &used)
                    };
                    if let Some(target) = target {
                        imports.push(Import {
                            from: path.clone(),
                            to: resolve(&target, modules),
                            line: statement_line,
                        });
                    }
                }
                statement.clear();
                statement_line = 0;
            }
            continue;
        }
        for used in inline_paths(trimmed) {
            if let Some(target) = absolute(path, depth, &used) {
                imports.push(Import {
                    from: path.clone(),
                    to: resolve(&target, modules),
                    line: number,
                });
            }
        }
    }
    imports
}

/// The paths a `use` tree names, e.g. `crate::{a::{b, c as d}, e::*}` gives
/// `crate::a::b`, `crate::a::c`, `crate::e`.
fn expand_use_tree(tree: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    expand_into(&[], tree.trim(), &mut out);
    out
}

fn expand_into(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim().trim_start_matches("::");
    if tree.is_empty() {
        return;
    }
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        for part in split_top_level(inner) {
            expand_into(prefix, part, out);
        }
        return;
    }
    // Up to the first `::{`, the path is plain.
    if let Some(open) = tree.find("::{") {
        let mut next = prefix.to_vec();
        next.extend(segments(&tree[..open]));
        expand_into(&next, &tree[open + 2..], out);
        return;
    }
    let plain = tree.split(" as ").next().unwrap_or(tree).trim();
    let mut path = prefix.to_vec();
    for segment in segments(plain) {
        if segment == "self" && !path.is_empty() {
            continue;
        }
        if segment == "*" {
            break;
        }
        path.push(segment);
    }
    if !path.is_empty() {
        out.push(path);
    }
}

fn segments(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Splits `a, b::{c, d}, e` at the commas outside braces.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (at, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `crate::a::b`, `super::x` and `self::y` paths written in code.
fn inline_paths(line: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = line[from..].find(start) {
            let at = from + found;
            from = at + start.len();
            // A whole word: not `$crate::` or `foo_crate::`.
            let before = line[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            // `super::super::x` is found once, from its first `super`.
            if start == "super::" && line[..at].ends_with("super::") {
                continue;
            }
            let path: Vec<String> = line[at..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or_default()
                .split("::")
                .filter(|s| is_ident(s))
                .map(str::to_owned)
                .collect();
            paths.push(path);
        }
    }
    paths
}

/// A path written in module `path` (inside `depth` inline modules) from the crate root;
/// `None` for paths that do not start with `crate`, `super` or `self`.
fn absolute(path: &ModPath, depth: usize, used: &[String]) -> Option<ModPath> {
    let first = used.first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "super" | "self" => path.clone(),
        _ => return None,
    };
    let mut rest = &used[1..];
    if first == "super" {
        // The first `super` leaves the innermost inline module, or the file's module.
        if depth == 0 {
            base.pop()?;
        }
        while rest.first().is_some_and(|s| s == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The deepest module `target` names, following re-exports of the item after it.
fn resolve(target: &[String], modules: &BTreeMap<ModPath, Module>) -> ModPath {
    let mut known = target.len();
    while known > 0 && !modules.contains_key(&target[..known]) {
        known -= 1;
    }
    let module = target[..known].to_vec();
    if let (Some(item), Some(entry)) = (target.get(known), modules.get(&module))
        && let Ok(text) = std::fs::read_to_string(&entry.file)
        && let Some(origin) = reexport_origin(&module, &text, item, modules)
        && origin != module
    {
        return resolve(&origin, modules);
    }
    module
}

/// Where module `module` (source `text`) re-exports `item` from, if it does.
fn reexport_origin(
    module: &ModPath,
    text: &str,
    item: &str,
    modules: &BTreeMap<ModPath, Module>,
) -> Option<ModPath> {
    let children = &modules.get(module)?.children;
    let mut statement = String::new();
    for (_, line) in code_lines(text) {
        let trimmed = line.trim();
        let is_start = trimmed.starts_with("pub") && strip_visibility(trimmed).starts_with("use ");
        if statement.is_empty() && !is_start {
            continue;
        }
        statement.push_str(trimmed);
        statement.push(' ');
        if !trimmed.ends_with(';') {
            continue;
        }
        let tree = strip_visibility(&statement)
            .trim_start_matches("use ")
            .trim_end()
            .trim_end_matches(';')
            .to_owned();
        statement.clear();
        for used in expand_use_tree(&tree) {
            if used.last().is_none_or(|last| last != item) {
                continue;
            }
            let mut full = if used.first().is_some_and(|f| children.contains(f)) {
                let mut full = module.clone();
                full.extend(used.iter().cloned());
                full
            } else {
                absolute(module, 0, &used)?
            };
            full.pop();
            return Some(full);
        }
    }
    None
}

/// Cycles between sibling subtrees, at every level of the module tree.
fn cycles(
    modules: &BTreeMap<ModPath, Module>,
    imports: &[Import],
) -> Vec<(BTreeSet<String>, String)> {
    // For each parent module: edges between its children, with one import as evidence.
    let mut graphs: BTreeMap<ModPath, BTreeMap<(String, String), &Import>> = BTreeMap::new();
    for import in imports {
        let (from, to) = (&import.from, &import.to);
        if from.starts_with(to) || to.starts_with(from) {
            continue;
        }
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        let edge = (from[common].clone(), to[common].clone());
        graphs
            .entry(from[..common].to_vec())
            .or_default()
            .entry(edge)
            .or_insert(import);
    }
    let mut found = Vec::new();
    for (parent, edges) in &graphs {
        for component in strongly_connected(edges.keys()) {
            let mut text = format!(
                "modules {{{}}} of `{}` import each other:",
                component.iter().cloned().collect::<Vec<_>>().join(", "),
                if parent.is_empty() {
                    "crate".to_owned()
                } else {
                    format!("crate::{}", parent.join("::"))
                }
            );
            for ((a, b), import) in edges {
                if component.contains(a) && component.contains(b) {
                    let file = modules
                        .get(&import.from)
                        .map_or_else(String::new, |m| m.file.display().to_string());
                    let _ = write!(
                        text,
                        "\n  {a} -> {b}: {file}:{} uses crate::{}",
                        import.line,
                        import.to.join("::")
                    );
                }
            }
            found.push((component, text));
        }
    }
    found
}

/// Components of more than one node (Tarjan's algorithm, iterative enough for module
/// graphs of a few dozen nodes).
fn strongly_connected<'a>(
    edges: impl Iterator<Item = &'a (String, String)>,
) -> Vec<BTreeSet<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
        next.entry(b).or_default();
    }
    let nodes: Vec<&str> = next.keys().copied().collect();
    // Reachability by depth-first search from each node; fine at this size.
    let reach = |start: &str| -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(node) = stack.pop() {
            for &to in next.get(node).map_or(&[][..], Vec::as_slice) {
                if seen.insert(to) {
                    stack.push(to);
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&str, BTreeSet<&str>> = nodes.iter().map(|&n| (n, reach(n))).collect();
    let mut components: Vec<BTreeSet<String>> = Vec::new();
    for &node in &nodes {
        if components.iter().any(|c| c.contains(node)) {
            continue;
        }
        let component: BTreeSet<String> = nodes
            .iter()
            .filter(|&&other| {
                other != node && reachable[node].contains(other) && reachable[other].contains(node)
            })
            .map(|&other| other.to_owned())
            .collect();
        if !component.is_empty() {
            let mut component = component;
            component.insert(node.to_owned());
            components.push(component);
        }
    }
    components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(path: &[&str]) -> Vec<String> {
        path.iter().map(|&s| s.to_owned()).collect()
    }

    #[test]
    fn use_trees_expand_to_paths() {
        let paths = expand_use_tree("crate::{a::{b, c as d, self}, e::*, f}");
        assert_eq!(
            paths,
            vec![
                strings(&["crate", "a", "b"]),
                strings(&["crate", "a", "c"]),
                strings(&["crate", "a"]),
                strings(&["crate", "e"]),
                strings(&["crate", "f"]),
            ]
        );
    }

    #[test]
    fn inline_paths_are_found_once() {
        let line = "let x = crate::probes::privileged() + super::super::y::z(); $crate::no";
        assert_eq!(
            inline_paths(line),
            vec![
                strings(&["crate", "probes", "privileged"]),
                strings(&["super", "super", "y", "z"]),
            ]
        );
    }

    #[test]
    fn super_climbs_out_of_inline_modules_first() {
        let here = strings(&["a", "b"]);
        assert_eq!(
            absolute(&here, 0, &strings(&["super", "c"])),
            Some(strings(&["a", "c"]))
        );
        assert_eq!(
            absolute(&here, 1, &strings(&["super", "c"])),
            Some(strings(&["a", "b", "c"]))
        );
    }

    /// A crate on disk: `files` are (path under src, contents).
    fn scratch_crate(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-cycles-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
            std::fs::write(&file, text).expect("write");
        }
        dir.join("lib.rs")
    }

    #[test]
    fn a_cycle_between_siblings_is_reported_and_a_child_using_its_parent_is_not() {
        let root = scratch_crate(
            "cycle",
            &[
                ("lib.rs", "mod cli;\nmod run;\nmod probes;\n"),
                ("cli.rs", "use crate::run::RunArgs;\n"),
                (
                    "run.rs",
                    "use crate::{\n    cli::CommonArgs,\n    probes::Probes,\n};\n",
                ),
                (
                    "probes/mod.rs",
                    "mod attach;\npub use attach::attach_all;\npub struct Probes;\n",
                ),
                (
                    "probes/attach.rs",
                    "use super::Probes;\npub fn attach_all() {}\n",
                ),
            ],
        );
        let cycles = check(&[root]).expect("reads");
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert!(
            cycles[0].report.contains("{cli, run}"),
            "{}",
            cycles[0].report
        );
        assert!(
            cycles[0].report.contains("run.rs:1"),
            "{}",
            cycles[0].report
        );
    }

    #[test]
    fn a_cycle_between_folders_counts_and_reexports_resolve_to_their_origin() {
        let root = scratch_crate(
            "folders",
            &[
                ("lib.rs", "mod sampling;\nmod probes;\n"),
                ("sampling/mod.rs", "mod record;\n"),
                ("sampling/record.rs", "use crate::probes::Probes;\n"),
                ("probes/mod.rs", "mod load;\npub use load::Probes;\n"),
                (
                    "probes/load.rs",
                    "pub struct Probes;\nfn f() { crate::sampling::x(); }\n",
                ),
            ],
        );
        let cycles = check(std::slice::from_ref(&root)).expect("reads");
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(
            cycles[0].modules,
            BTreeSet::from(["probes".to_owned(), "sampling".to_owned()])
        );
        // Without the call back, the graph is a tree.
        std::fs::write(
            root.with_file_name("probes").join("load.rs"),
            "pub struct Probes;\n",
        )
        .expect("write");
        assert!(check(&[root]).expect("reads").is_empty());
    }
}
