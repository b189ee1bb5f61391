//! Symbolization benchmarks: the cached path every profile takes for stacks seen before
//! (normalized stack -> frames through the per-binary cache), and the cold first
//! symbolization of a large binary, the agent itself.
//!
//! `cargo xtask bench symbolize` runs them (after a release build, so "the agent itself"
//! is `target/release/stallscope-agent`).

use std::{
    fs::File,
    hint::black_box,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use object::{Object, ObjectSymbol, SymbolKind};
use stallscope_agent::{
    process::procfs::FileId,
    symbols::{
        binaries::BinaryFile,
        elf,
        resolver::{Resolver, ResolverSettings},
        symbolize::{DWARF_MAX_BYTES, LaneSymbolizers, symbolize_offsets},
    },
};

/// Code addresses in this binary: starts of functions of the agent library, each
/// looked up as a return address a few bytes into the function.
fn own_stack() -> Vec<u64> {
    let functions: [u64; 16] = [
        stallscope_agent::process::identity::redact_args as *const () as u64,
        stallscope_agent::process::identity::cmdline_label as *const () as u64,
        stallscope_agent::process::identity::from_proc_cgroup as *const () as u64,
        stallscope_agent::process::identity::from_cgroup_path as *const () as u64,
        stallscope_agent::process::identity::service_of as *const () as u64,
        stallscope_agent::process::procfs::parse_maps as *const () as u64,
        stallscope_agent::process::procfs::find_mapping as *const () as u64,
        stallscope_agent::process::procfs::parse_ns_pid as *const () as u64,
        stallscope_agent::process::procfs::parse_cmdline as *const () as u64,
        stallscope_agent::process::snapshot::read_snapshot as *const () as u64,
        elf::inspect as *const () as u64,
        elf::hex as *const () as u64,
        stallscope_agent::symbols::binaries::reaches_root as *const () as u64,
        stallscope_agent::symbols::symbolize::lookup_addresses as *const () as u64,
        stallscope_agent::process::events::parse_events as *const () as u64,
        stallscope_agent::symbols::binaries::own_vdso as *const () as u64,
    ];
    // 32 frames, as deep as a typical service stack.
    functions.iter().flat_map(|&f| [f + 5, f + 9]).collect()
}

fn cached(c: &mut Criterion) {
    let pid = std::process::id();
    let mut resolver = Resolver::new(ResolverSettings {
        target_pid: Some(pid),
        ..ResolverSettings::default()
    });
    resolver.discover(pid);
    resolver.add_user_stack(pid, 1, &own_stack());
    resolver.settle();
    let (frames, _) = resolver.user_frames(pid, 1).expect("stack normalized");
    assert!(
        frames.iter().all(|f| !f.function.starts_with("[unknown]")),
        "{frames:?}"
    );
    let mut group = c.benchmark_group("symbolize");
    group.throughput(Throughput::Elements(frames.len() as u64));
    group.bench_function("cached stack (frames/s)", |b| {
        b.iter(|| black_box(resolver.user_frames(pid, 1)));
    });
    group.finish();
}

/// The agent's release binary if built, else this benchmark (which links all of it).
fn large_binary() -> PathBuf {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/stallscope-agent");
    if release.is_file() {
        release
    } else {
        PathBuf::from("/proc/self/exe")
    }
}

/// File offsets of up to `count` function symbols spread over the binary.
fn function_offsets(path: &Path, info: &elf::ElfInfo, count: usize) -> Vec<u64> {
    let bytes = std::fs::read(path).expect("binary readable");
    let object = object::File::parse(bytes.as_slice()).expect("ELF");
    let mut addresses: Vec<u64> = object
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 8)
        .map(|s| s.address() + 4)
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    let step = addresses.len().div_ceil(count).max(1);
    addresses
        .into_iter()
        .step_by(step)
        .filter_map(|a| info.offset_of(a))
        .collect()
}

fn cold(c: &mut Criterion) {
    let path = large_binary();
    let file = File::open(&path).expect("binary");
    let size = file.metadata().map_or(0, |m| m.len());
    let info = elf::inspect(&file).expect("ELF");
    let offsets = function_offsets(&path, &info, 1000);
    let binary = BinaryFile {
        file_id: FileId { dev: 0, inode: 0 },
        path: Arc::from(path.display().to_string()),
        file,
        debug: None,
        info,
    };
    let started = Instant::now();
    let frames = symbolize_offsets(
        &mut LaneSymbolizers::default(),
        0,
        &binary,
        &offsets,
        DWARF_MAX_BYTES,
    );
    eprintln!(
        "cold: first symbolization of {} addresses in {} ({:.1} MB): {:?}",
        frames.len(),
        path.display(),
        size as f64 / 1e6,
        started.elapsed()
    );
    let mut group = c.benchmark_group("symbolize");
    group.sample_size(10);
    group.bench_function("cold, 1000 addresses of the agent binary", |b| {
        b.iter_batched(
            LaneSymbolizers::default,
            |mut lane| {
                black_box(symbolize_offsets(
                    &mut lane,
                    0,
                    &binary,
                    &offsets,
                    DWARF_MAX_BYTES,
                ))
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, cached, cold);
criterion_main!(benches);
