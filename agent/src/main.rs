use std::time::Duration;

use stallscope_agent::probes::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let settings = ProbeSettings {
        offcpu: true,
        oncpu: true,
        offcpu_stack_threshold: Duration::from_nanos(args[2].parse()?),
        oncpu_frequency_hz: 49,
        target_tgid: None,
        sched_hook: if args[1] == "tp" {
            SchedHookChoice::Tracepoint
        } else {
            SchedHookChoice::Auto
        },
        btf_path: None,
        map_sizes: MapSizes::default(),
    };
    let _stats = if std::env::var("STATS").is_ok() {
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime)?)
    } else {
        None
    };
    let mut p = Probes::load(&settings)?;
    eprintln!("hook {:?}", p.sched_hook);
    let secs: u64 = args[3].parse()?;
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        let d = p.drain()?;
        let total: u64 = d.totals.iter().map(|(_, v)| v.count).sum();
        let stacked: u64 = d
            .samples
            .iter()
            .map(|(_, v)| v.count + (v.est_count_fp >> 10))
            .sum();
        eprintln!(
            "totals {} samples {} stacks {} losses {:?} waits {} stacked {}",
            d.totals.len(),
            d.samples.len(),
            d.stacks.len(),
            d.losses,
            total,
            stacked
        );
    }
    for info in aya::programs::loaded_programs().flatten() {
        let n = info.run_count();
        if n > 0 {
            eprintln!(
                "{:?} runs {} avg {} ns",
                info.name_as_str(),
                n,
                info.run_time().as_nanos() as u64 / n
            );
        }
    }
    Ok(())
}
