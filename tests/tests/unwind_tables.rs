//! The agent's unwind tables against binutils' reading of the same call frame
//! information (`readelf --debug-dump=frames-interp`): at every address where either
//! side starts a row, both must give the same rule for the canonical frame address, the
//! return address and the saved frame pointer. Over a C program built without frame
//! pointers (`.eh_frame`), the same built with `.debug_frame` only, the C library, and a
//! Rust binary (this test's own). No privileges needed.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use agent_common::{CfaKind, RbpKind, UnwindRow};
use stallscope_agent::unwind::table::{self, Source, UnwindTable};
use stallscope_tests::{fixtures::compile_identapp, scratch_dir};

/// A row as readelf prints it: the CFA, the return address's and rbp's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Printed {
    cfa: String,
    ra: String,
    rbp: String,
}

/// One function (FDE) as readelf prints it: its address range and rows.
#[derive(Debug)]
struct Function {
    end: u64,
    rows: Vec<(u64, Printed)>,
}

/// The functions readelf prints for `section` (`.eh_frame` or `.debug_frame`) of
/// `binary`, by start address.
fn readelf(binary: &Path, section: &str) -> BTreeMap<u64, Function> {
    let output = Command::new("readelf")
        // Not the separate debug file a debuglink names: the agent reads the binary.
        .args([
            "--wide",
            "--debug-dump=no-follow-links",
            "--debug-dump=frames-interp",
        ])
        .arg(binary)
        .output()
        .expect("readelf runs (cargo xtask test installs binutils)");
    assert!(
        output.status.success(),
        "readelf on {}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut functions = BTreeMap::new();
    let mut in_section = false;
    let mut columns: Vec<String> = Vec::new();
    let mut current: Option<(u64, Function)> = None;
    // Each CIE's initial rule (by its offset), which an FDE without instructions of
    // its own keeps: readelf prints no row for such an FDE.
    let mut cie_rules: BTreeMap<String, Printed> = BTreeMap::new();
    let mut current_cie: Option<String> = None;
    let mut fde_cie: BTreeMap<u64, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Contents of the ") {
            in_section = rest.starts_with(&format!("{section} section"));
            continue;
        }
        if !in_section {
            continue;
        }
        if line.contains(" FDE ") {
            if let Some((start, function)) = current.take() {
                functions.insert(start, function);
            }
            let range = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("pc="))
                .expect("pc= in an FDE line");
            let (start, end) = range.split_once("..").expect("pc=start..end");
            let hex = |text: &str| u64::from_str_radix(text, 16).expect("hex address");
            current_cie = None;
            if let Some(cie) = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("cie="))
            {
                fde_cie.insert(hex(start), cie.to_owned());
            }
            current = Some((
                hex(start),
                Function {
                    end: hex(end),
                    rows: Vec::new(),
                },
            ));
        } else if line.contains(" CIE ") || line.contains("ZERO terminator") {
            if let Some((start, function)) = current.take() {
                functions.insert(start, function);
            }
            current_cie = line.contains(" CIE ").then(|| {
                line.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            });
        } else if line.trim_start().starts_with("LOC") {
            columns = line.split_whitespace().map(str::to_owned).collect();
        } else {
            // A rule naming a register prints as `r10 (r10)`: one column.
            let mut words: Vec<String> = Vec::new();
            for word in line.split_whitespace() {
                match words.last_mut() {
                    Some(last) if word.starts_with('(') => {
                        last.push(' ');
                        last.push_str(word);
                    }
                    _ => words.push(word.to_owned()),
                }
            }
            let Some(Ok(loc)) = words.first().map(|w| u64::from_str_radix(w, 16)) else {
                continue;
            };
            let column = |name: &str| {
                columns
                    .iter()
                    .position(|c| c == name)
                    .and_then(|index| words.get(index))
                    .map_or("u".to_owned(), Clone::clone)
            };
            let printed = Printed {
                cfa: words.get(1).cloned().unwrap_or_default(),
                ra: column("ra"),
                rbp: column("rbp"),
            };
            if let Some((_, function)) = current.as_mut() {
                function.rows.push((loc, printed));
            } else if let Some(cie) = &current_cie {
                cie_rules.entry(cie.clone()).or_insert(printed);
            }
        }
    }
    if let Some((start, function)) = current.take() {
        functions.insert(start, function);
    }
    for (start, function) in &mut functions {
        if function.rows.is_empty()
            && let Some(rule) = fde_cie.get(start).and_then(|cie| cie_rules.get(cie))
        {
            function.rows.push((*start, rule.clone()));
        }
    }
    functions
}

/// readelf's rule at `pc`, if one of its functions covers it.
fn printed_at(functions: &BTreeMap<u64, Function>, pc: u64) -> Option<&Printed> {
    let (_, function) = functions.range(..=pc).next_back()?;
    if pc >= function.end {
        return None;
    }
    function
        .rows
        .iter()
        .rev()
        .find(|(loc, _)| *loc <= pc)
        .map(|(_, printed)| printed)
}

/// Whether the agent's row gives readelf's rule; `plt` counts PLT stubs recognized.
fn agrees(row: &UnwindRow, printed: &Printed, plt: &mut u64) -> bool {
    let kind = CfaKind::from_u8(row.cfa_kind).expect("a known kind");
    let cfa_ok = if printed.ra == "u" {
        kind == CfaKind::Outermost
    } else if printed.ra != "c-8" {
        kind == CfaKind::Unsupported
    } else if printed.cfa == "exp" {
        *plt += u64::from(kind == CfaKind::Plt);
        matches!(kind, CfaKind::Plt | CfaKind::Unsupported)
    } else if let Some((register, offset)) = printed.cfa.split_once('+') {
        match (register, offset.parse::<i64>()) {
            ("rsp", Ok(offset)) if i16::try_from(offset).is_ok() => {
                kind == CfaKind::StackPointer && i64::from(row.cfa_offset) == offset
            }
            ("rbp", Ok(offset)) if i16::try_from(offset).is_ok() => {
                kind == CfaKind::FramePointer && i64::from(row.cfa_offset) == offset
            }
            _ => kind == CfaKind::Unsupported,
        }
    } else {
        kind == CfaKind::Unsupported
    };
    let rbp = RbpKind::from_u8(row.rbp_kind).expect("a known kind");
    let rbp_ok = match printed.rbp.as_str() {
        "u" | "s" => rbp == RbpKind::Unchanged,
        saved => match saved.strip_prefix("c").map(str::parse::<i64>) {
            Some(Ok(offset)) if i16::try_from(offset).is_ok() => {
                rbp == RbpKind::AtCfa && i64::from(row.rbp_offset) == offset
            }
            _ => rbp == RbpKind::Unsupported,
        },
    };
    cfa_ok && rbp_ok
}

/// readelf's functions of the sections a table was built from: with both, those of
/// `.debug_frame` that no function of `.eh_frame` overlaps.
fn readelf_functions(binary: &Path, source: Source) -> BTreeMap<u64, Function> {
    match source {
        Source::EhFrame => readelf(binary, ".eh_frame"),
        Source::DebugFrame => readelf(binary, ".debug_frame"),
        Source::Both => {
            let mut functions = readelf(binary, ".eh_frame");
            let extra: Vec<(u64, Function)> = readelf(binary, ".debug_frame")
                .into_iter()
                .filter(|(start, function)| {
                    !functions
                        .iter()
                        .any(|(s, f)| *s < function.end && f.end > *start)
                })
                .collect();
            functions.extend(extra);
            functions
        }
    }
}

/// Builds `binary`'s table and checks it against readelf both ways; the table.
fn check_against_readelf(binary: &Path) -> UnwindTable {
    let file = File::open(binary).expect("open the binary");
    let table = table::build(&file).expect("an unwind table");
    let functions = readelf_functions(binary, table.source);
    assert!(
        !functions.is_empty(),
        "readelf printed no function for {}",
        binary.display()
    );
    let mut plt = 0;
    let mut disagreements = Vec::new();
    let mut checked = 0u64;
    for function in functions.values() {
        for (loc, printed) in &function.rows {
            checked += 1;
            match table.lookup(*loc) {
                Some(row) if agrees(row, printed, &mut plt) => {}
                found => {
                    disagreements.push(format!("{loc:#x}: readelf {printed:?}, agent {found:?}"));
                }
            }
        }
    }
    for row in &table.rows {
        checked += 1;
        match printed_at(&functions, row.pc) {
            None if row.cfa_kind == CfaKind::NotCovered as u8 => {}
            Some(printed) if row.cfa_kind != CfaKind::NotCovered as u8 => {
                if !agrees(row, printed, &mut 0) {
                    disagreements
                        .push(format!("{:#x}: agent {row:?}, readelf {printed:?}", row.pc));
                }
            }
            printed => {
                disagreements.push(format!("{:#x}: agent {row:?}, readelf {printed:?}", row.pc));
            }
        }
    }
    eprintln!(
        "{}: {} functions, {} rows ({} bytes) from {}, {checked} addresses checked, {} unsupported CFA rows, {plt} PLT rows",
        binary.display(),
        table.stats.functions,
        table.rows.len(),
        table.bytes(),
        table.source.section(),
        table.stats.unsupported_cfa,
    );
    assert!(
        disagreements.is_empty(),
        "{} of {checked} addresses disagree with readelf in {}; first: {:#?}",
        disagreements.len(),
        binary.display(),
        &disagreements[..disagreements.len().min(10)]
    );
    assert_eq!(table.stats.skipped_functions, 0, "{}", binary.display());
    table
}

/// The C library this test runs with, from its own mappings.
fn libc_path() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("own maps");
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libc.so"))
        })
        .map(PathBuf::from)
        .expect("libc mapped")
}

#[test]
fn tables_of_c_without_frame_pointers_agree_with_readelf() {
    let dir = scratch_dir("unwind-c");
    let binary = dir.join("identapp-nofp");
    compile_identapp(&binary, &["-O2", "-g", "-fomit-frame-pointer"]);
    let table = check_against_readelf(&binary);
    assert_eq!(table.source, Source::EhFrame);
    // Its functions adjust the stack pointer and keep no frame pointer: a frame-pointer
    // walk has nothing to follow there, the table does.
    for function in ["main", "outer_marker"] {
        let address = symbol_address(&binary, function);
        let row = table.lookup(address).expect("the function is covered");
        assert_eq!(row.cfa_kind, CfaKind::StackPointer as u8, "{function}");
        assert_eq!(row.cfa_offset, 8, "{function}: at entry the CFA is rsp + 8");
    }
    let plain = dir.join("identapp-debug-frame");
    compile_identapp(
        &plain,
        &[
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-asynchronous-unwind-tables",
        ],
    );
    // gcc leaves .eh_frame to the C runtime's start-up objects then: the program's own
    // functions are described in .debug_frame only, and must be covered from there.
    let table = check_against_readelf(&plain);
    assert!(
        matches!(table.source, Source::Both | Source::DebugFrame),
        "{:?}",
        table.source
    );
    for function in ["main", "outer_marker"] {
        let address = symbol_address(&plain, function);
        let row = table.lookup(address).expect("covered from .debug_frame");
        assert_eq!(row.cfa_kind, CfaKind::StackPointer as u8, "{function}");
    }
}

#[test]
fn the_c_library_and_a_rust_binary_agree_with_readelf() {
    let libc = check_against_readelf(&libc_path());
    assert!(libc.stats.functions > 1000, "{:?}", libc.stats);
    let own = std::env::current_exe().expect("own path");
    let rust = check_against_readelf(&own);
    assert!(rust.stats.functions > 1000, "{:?}", rust.stats);
}

/// The address of `function` in `binary` (`nm`).
fn symbol_address(binary: &Path, function: &str) -> u64 {
    let output = Command::new("nm")
        .arg(binary)
        .output()
        .expect("nm runs (cargo xtask test installs binutils)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            let address = words.next()?;
            let _kind = words.next()?;
            (words.next()? == function).then(|| u64::from_str_radix(address, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{function} in {}", binary.display()))
}

#[test]
fn the_vdso_table_agrees_with_readelf() {
    // The agent's own vDSO, as it tables every process's (saved to a memory file).
    let vdso = stallscope_agent::symbols::binaries::own_vdso().expect("a vDSO");
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&vdso.file)
    ));
    let table = check_against_readelf(&path);
    assert!(table.stats.functions > 0, "{:?}", table.stats);
}
