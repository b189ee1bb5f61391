//! `stallscope-agent check --pid` says whether a process's binaries keep frame pointers,
//! and must be right both ways: C built with and without `-fno-omit-frame-pointer` (the C
//! runtime's start-up code, linked into every C program, has none either way), the
//! bundled Rust workload (forced frame pointers) and a Rust release build without them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use stallscope_tests::{
    Workload, binary, binary_dir, fixtures::compile_identapp, record_started, require_root,
    scratch_dir, serial,
};

/// The `frame pointers: ...` verdict `check --pid` gives for `exe` in process `pid`,
/// and how its stacks will be unwound (`unwound by ...`).
fn verdict(pid: u32, exe: &Path) -> (String, String) {
    let output = Command::new(binary(&binary_dir(), "stallscope-agent").expect("agent built"))
        .args(["check", "--signals", "offcpu", "--pid", &pid.to_string()])
        .output()
        .expect("check runs");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let exe = exe.to_string_lossy();
    let line = report
        .lines()
        .find(|line| line.trim_start().starts_with(exe.as_ref()))
        .unwrap_or_else(|| panic!("no line for {exe} in:\n{report}"));
    let part = |prefix: &str| {
        line.split("; ")
            .find(|part| part.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in {line}"))
            .to_owned()
    };
    (part("frame pointers: "), part("unwound by "))
}

/// A Rust program that speaks the workload's protocol (`ready PID`, waits for a line),
/// built with `rustc -O` and no frame pointers, as a release build of a service is.
fn compile_rust_release(dir: &Path) -> PathBuf {
    let source = dir.join("release.rs");
    std::fs::write(
        &source,
        r#"use std::io::BufRead;
#[inline(never)]
fn words(text: &str) -> Vec<String> { text.split_whitespace().map(str::to_uppercase).collect() }
#[inline(never)]
fn count(words: &[String]) -> usize { words.iter().map(|w| w.len()).sum::<usize>() + words.len() }
#[inline(never)]
fn report(text: &str) -> String { let w = words(text); format!("{} words, {} bytes", w.len(), count(&w)) }
#[inline(never)]
fn twice(text: &str) -> String { let one = report(text); let two = report(&one); one + &two }
fn main() {
    println!("ready {}", std::process::id());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    println!("{}", twice(&line));
    line.clear();
    let _ = std::io::stdin().lock().read_line(&mut line);
}
"#,
    )
    .expect("write source");
    let output = dir.join("release");
    let status = Command::new("rustc")
        .args(["-O", "-C", "force-frame-pointers=no", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
        .expect("rustc runs");
    assert!(status.success(), "rustc failed");
    output
}

fn check_program(exe: &Path, args: &[&str]) -> (String, String) {
    let workload = Workload::start(exe, args).expect("program starts");
    verdict(workload.pid, exe)
}

#[test]
fn frame_pointer_verdicts_are_right_both_ways() {
    if !require_root("frame_pointer_verdicts_are_right_both_ways") {
        return;
    }
    let dir = scratch_dir("frame-pointers");
    let with = dir.join("c-with-fp");
    compile_identapp(&with, &["-O2", "-g", "-fno-omit-frame-pointer"]);
    let without = dir.join("c-without-fp");
    compile_identapp(&without, &["-O2", "-g", "-fomit-frame-pointer"]);
    let rust_release = compile_rust_release(&dir);
    let workload = binary(&binary_dir(), "stallscope-workload").expect("workload built");

    let verdicts = [
        (with.clone(), check_program(&with, &["1"]), true),
        (without.clone(), check_program(&without, &["1"]), false),
        (workload.clone(), check_program(&workload, &["pulse"]), true),
        (
            rust_release.clone(),
            check_program(&rust_release, &[]),
            false,
        ),
    ];
    for (exe, (verdict, unwound), expected) in &verdicts {
        eprintln!("{}: {verdict}; {unwound}", exe.display());
        // Binaries without frame pointers get an unwind table from their .eh_frame.
        let wanted_unwind = if *expected {
            "unwound by frame pointers"
        } else {
            "unwound by table: "
        };
        assert!(
            unwound.starts_with(wanted_unwind),
            "{}: `{unwound}`, expected `{wanted_unwind}`",
            exe.display()
        );
        let wanted = if *expected {
            "frame pointers: yes"
        } else {
            "frame pointers: NO"
        };
        assert!(
            verdict.starts_with(wanted),
            "{}: `{verdict}`, expected `{wanted}`",
            exe.display()
        );
    }
}

/// The profile's table of binaries says the same as `check`. (Only binaries that stacks
/// reach are in it: a C program without frame pointers is not, its stacks end in libc.)
#[test]
fn the_profiles_binaries_table_agrees() {
    if !require_root("the_profiles_binaries_table_agrees") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("frame-pointers-profile");
    let exe = dir.join("c-with-fp");
    compile_identapp(&exe, &["-O2", "-g", "-fno-omit-frame-pointer"]);
    let workload = Workload::start(&exe, &["4"]).expect("program starts");
    let (profile, _) = record_started("c-with-fp", workload, "fp.pb.gz", &["--signals", "offcpu"]);
    let path = exe.to_string_lossy();
    let entry = profile
        .meta
        .binaries
        .iter()
        .find(|b| b.path == path)
        .unwrap_or_else(|| panic!("{path} not in {:?}", profile.meta.binaries));
    assert_eq!(entry.frame_pointers, Some(true), "{entry:?}");
}
