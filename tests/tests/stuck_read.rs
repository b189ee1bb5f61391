//! End to end, as root: a read that never returns delays nothing else. A process runs a
//! binary from a FUSE filesystem that stops answering; the agent's attempt to open that
//! binary hangs in the kernel, and the profile of another workload still arrives
//! complete, without waiting for it.

use std::time::Duration;

use stallscope_profile::{FrameKind, Sample};
use stallscope_tests::{
    Workload, binary, binary_dir,
    fixtures::{self, Build},
    fuse::FrozenFs,
    label, require_root, scratch_dir, serial, start_agent, value_index,
};

#[test]
fn a_hung_filesystem_delays_no_other_profile() {
    if !require_root("a_hung_filesystem_delays_no_other_profile") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("stuck");
    let app = dir.join("identapp");
    fixtures::build_identapp(
        &app,
        Build {
            version: "stuck",
            build_id: true,
            split_debug: false,
        },
    )
    .expect("builds the C workload");
    let mount_point = dir.join("mnt");
    std::fs::create_dir_all(&mount_point).expect("mount point");
    let fs = FrozenFs::mount(
        &mount_point,
        "stuckapp",
        std::fs::read(&app).expect("binary"),
    )
    .expect("FUSE mount (needs /dev/fuse)");
    // Started while the filesystem answers, then frozen: whoever opens the binary now
    // blocks in the kernel for good.
    let stuck = Workload::start(&mount_point.join("stuckapp"), &["1"]).expect("stuck app");
    fs.freeze();

    let workload = binary(&binary_dir(), "stallscope-workload").expect("workload built");
    let mut other = Workload::start(&workload, &["markers", "300"]).expect("workload");
    let out = dir.join("stuck.pb.gz");
    let out_arg = out.to_string_lossy().into_owned();
    // The whole host: the agent reads both processes and opens both binaries.
    let mut agent = start_agent(&[
        "record",
        "--duration",
        "10m",
        "--signals",
        "offcpu",
        "-o",
        &out_arg,
    ])
    .expect("agent starts");
    let _unstick = fs.abort_on_drop();
    other.go().expect("go");
    other
        .wait_done(Duration::from_secs(60))
        .expect("scenario done");
    // Stopped at once, long before the hung open's deadline: the profile must not wait.
    // The agent cannot exit while one of its threads is stuck in the filesystem (Linux
    // lets no signal interrupt a FUSE request the server took), but its profile is out.
    agent.interrupt();
    let log = agent
        .wait_log("wrote ", Duration::from_secs(60))
        .expect("the profile is written while a read is stuck");
    assert!(
        fs.withheld() > 0,
        "nothing ever blocked on the frozen filesystem"
    );
    assert!(
        !log.contains("not resolved within"),
        "the profile waited for something: {log}"
    );
    let profile = stallscope_profile::decode_pprof(&std::fs::read(&out).expect("written"))
        .expect("valid pprof");

    let pid = other.pid.to_string();
    let off = value_index(&profile, "off_cpu", "nanoseconds");
    let mine = |s: &Sample| label(s, "pid") == pid;
    let marker = profile.total_where(off, |s| {
        mine(s) && profile.stack_contains(s, "offcpu_marker_sleep")
    }) as f64;
    assert!(
        (marker - 1e9).abs() <= 1e8,
        "off-CPU time in offcpu_marker_sleep: {marker:.0} ns, expected 1 s"
    );
    for sample in profile.samples.iter().filter(|s| mine(s)) {
        let unknown: Vec<&str> = profile
            .stack_frames(sample)
            .filter(|f| f.kind == FrameKind::User && f.function.starts_with("[unknown]"))
            .map(|f| f.function.as_str())
            .collect();
        assert!(
            unknown.is_empty(),
            "unsymbolized frames in thread {} ({}): {unknown:?}; whole stack: {:?}; maps now: {}",
            label(sample, "thread"),
            label(sample, "tid"),
            profile
                .stack_frames(sample)
                .map(|f| f.function.as_str())
                .collect::<Vec<_>>(),
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
        );
    }
    assert!(
        other
            .finish(Duration::from_secs(10))
            .expect("exits")
            .success()
    );
    drop(stuck);
    // Aborting the filesystem fails the withheld requests; then the agent can exit.
    fs.abort();
    let exit = agent.wait(Duration::from_secs(60)).expect("agent exits");
    assert!(exit.status.success(), "agent failed: {}", exit.stderr);
}

#[test]
fn the_test_filesystem_serves_its_file_until_frozen() {
    if !require_root("the_test_filesystem_serves_its_file_until_frozen") {
        return;
    }
    let dir = scratch_dir("fuse-serves");
    let mount_point = dir.join("mnt");
    std::fs::create_dir_all(&mount_point).expect("mount point");
    let contents: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let fs = FrozenFs::mount(&mount_point, "data", contents.clone()).expect("FUSE mount");
    let path = mount_point.join("data");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(&reader).map_err(|e| e.to_string()));
    });
    let read = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the unfrozen filesystem answers");
    assert_eq!(read.map(|r| r == contents), Ok(true));
    fs.freeze();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(&path).is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "an open of the frozen file returned"
    );
    assert!(fs.withheld() > 0);
    drop(fs);
}
