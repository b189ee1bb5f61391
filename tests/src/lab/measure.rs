//! What stallscope measured, read back through the collector's query API (gRPC `Query`,
//! as the CLI does): the merged profile of a time range with all its labels, and sums
//! over it that the lab's checks compare with the ground truth (wait time by cause, per
//! peer, per lock address, per process, per function; retransmits; build-ids).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use stallscope_profile::{Profile, Sample, decode_pprof_with_limit};
use stallscope_proto::v1::{self, query_client::QueryClient};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

const MAX_RESPONSE_BYTES: usize = 1 << 30;

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A query client with its own small runtime (the lab is synchronous).
pub struct Query {
    runtime: tokio::runtime::Runtime,
    client: QueryClient<InterceptedService<Channel, Bearer>>,
}

impl Query {
    pub fn connect(url: &str, token: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = runtime
            .block_on(
                tonic::transport::Endpoint::from_shared(url.to_owned())?
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .connect(),
            )
            .with_context(|| format!("connecting to the collector at {url}"))?;
        let token = MetadataValue::try_from(format!("Bearer {token}"))
            .context("the token cannot go in a header")?;
        let client = QueryClient::with_interceptor(channel, Bearer(token))
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(Self { runtime, client })
    }

    /// The merged profile of `[from, until)` (storage buckets whose start lies inside).
    pub fn window(
        &mut self,
        from_unix_ns: i64,
        until_unix_ns: i64,
        filter: v1::Filter,
    ) -> anyhow::Result<Window> {
        let request = v1::ProfileRequest {
            range: Some(v1::TimeRange {
                from_unix_ns,
                until_unix_ns,
            }),
            filter: Some(filter),
        };
        let response = self
            .runtime
            .block_on(self.client.profile(request))
            .context("querying a profile")?
            .into_inner();
        let profile = decode_pprof_with_limit(&response.pprof, MAX_RESPONSE_BYTES as u64)
            .context("decoding the collector's profile")?;
        Ok(Window {
            from_unix_ns,
            until_unix_ns,
            profile,
        })
    }

    /// The start of the newest batch stored, over all agents.
    pub fn last_batch_unix_ns(&mut self) -> anyhow::Result<Option<i64>> {
        let agents = self
            .runtime
            .block_on(self.client.agents(v1::AgentsRequest {}))
            .context("querying agents")?
            .into_inner()
            .agents;
        Ok(agents.iter().map(|a| a.last_batch_unix_ns).max())
    }

    /// The automatic windows of `service` that overlap `[from, until)`.
    pub fn automatic_windows(
        &mut self,
        service: &str,
        from_unix_ns: i64,
        until_unix_ns: i64,
    ) -> anyhow::Result<Vec<v1::Window>> {
        let request = v1::WindowsRequest {
            range: Some(v1::TimeRange {
                from_unix_ns,
                until_unix_ns,
            }),
            filter: Some(v1::Filter {
                service: service.to_owned(),
                ..v1::Filter::default()
            }),
            source: "automatic".to_owned(),
            state: String::new(),
        };
        Ok(self
            .runtime
            .block_on(self.client.windows(request))
            .context("querying windows")?
            .into_inner()
            .windows)
    }
}

/// A profile of one time range, with sums over it.
pub struct Window {
    pub from_unix_ns: i64,
    pub until_unix_ns: i64,
    pub profile: Profile,
}

fn label<'a>(sample: &'a Sample, key: &str) -> &'a str {
    sample.labels.get(key).map_or("", String::as_str)
}

impl Window {
    pub fn seconds(&self) -> f64 {
        (self.until_unix_ns - self.from_unix_ns) as f64 / 1e9
    }

    /// `ns` (a total over the window) per second of wall time.
    pub fn per_second(&self, ns: i64) -> f64 {
        ns as f64 / self.seconds().max(1e-9)
    }

    /// The sum of column `kind` (e.g. `off_cpu`, `tcp_events`) over the samples `keep`
    /// selects; 0 when the profile has no such column.
    pub fn sum(&self, kind: &str, keep: impl Fn(&Sample) -> bool) -> i64 {
        let Some(index) = self
            .profile
            .sample_types
            .iter()
            .position(|t| t.kind == kind)
        else {
            return 0;
        };
        self.profile.total_where(index, keep)
    }

    /// Wait time of `service` in one cause category: off-CPU time with that `cause`, or
    /// on-CPU time for `cpu-work`.
    pub fn cause_ns(&self, service: &str, cause: &str) -> i64 {
        let of_service = |s: &Sample| label(s, "service") == service;
        if cause == "cpu-work" {
            self.sum("on_cpu", of_service)
        } else {
            self.sum("off_cpu", |s| of_service(s) && label(s, "cause") == cause)
        }
    }

    /// Every cause category's time for `service`.
    pub fn causes(&self, service: &str) -> BTreeMap<String, i64> {
        [
            "cpu-work",
            "cpu-contention",
            "lock",
            "disk",
            "network",
            "other",
        ]
        .into_iter()
        .map(|cause| (cause.to_owned(), self.cause_ns(service, cause)))
        .collect()
    }

    /// Time `service` waited on replies from `peer` (client side of its connections).
    pub fn socket_wait_ns(&self, service: &str, peer: &str) -> i64 {
        self.sum("socket_wait", |s| {
            label(s, "service") == service
                && label(s, "peer") == peer
                && label(s, "direction") == "client"
        })
    }

    /// TCP retransmits of `service`'s connections to `peer`.
    pub fn retransmits(&self, service: &str, peer: &str) -> i64 {
        self.sum("tcp_events", |s| {
            label(s, "service") == service
                && label(s, "peer") == peer
                && label(s, "event") == "retransmit"
        })
    }

    /// Lock-signal wait time of `service` per lock address (futex words and kernel
    /// locks); with `contention_only`, only waits the agent labelled `lock_wait=contention`.
    pub fn lock_wait_by_address(&self, service: &str, contention_only: bool) -> BTreeMap<u64, i64> {
        let mut out = BTreeMap::new();
        let Some(index) = self
            .profile
            .sample_types
            .iter()
            .position(|t| t.kind == "lock_wait")
        else {
            return out;
        };
        for sample in &self.profile.samples {
            if label(sample, "service") != service
                || (contention_only && label(sample, "lock_wait") != "contention")
            {
                continue;
            }
            let Some(address) = label(sample, "lock")
                .strip_prefix("0x")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            *out.entry(address).or_default() += sample.values.get(index).copied().unwrap_or(0);
        }
        out
    }

    /// On-CPU time per process name.
    pub fn oncpu_by_process(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        let Some(index) = self
            .profile
            .sample_types
            .iter()
            .position(|t| t.kind == "on_cpu")
        else {
            return out;
        };
        for sample in &self.profile.samples {
            *out.entry(label(sample, "process").to_owned()).or_default() +=
                sample.values.get(index).copied().unwrap_or(0);
        }
        out.retain(|_, ns| *ns > 0);
        out
    }

    /// Column `kind` of `service`'s samples whose stack contains a frame named like
    /// `function` (a suffix match on the symbol, e.g. `render_page`).
    pub fn function_ns(&self, service: &str, kind: &str, function: &str) -> i64 {
        self.sum(kind, |s| {
            label(s, "service") == service
                && self.profile.stack_frames(s).any(|f| {
                    f.function == function || f.function.ends_with(&format!("::{function}"))
                })
        })
    }

    /// Build-ids of `service`'s samples that carry time in column `kind`.
    pub fn build_ids(&self, service: &str, kind: &str) -> BTreeSet<String> {
        let Some(index) = self
            .profile
            .sample_types
            .iter()
            .position(|t| t.kind == kind)
        else {
            return BTreeSet::new();
        };
        self.profile
            .samples
            .iter()
            .filter(|s| {
                label(s, "service") == service && s.values.get(index).is_some_and(|v| *v > 0)
            })
            .map(|s| label(s, "build_id").to_owned())
            .filter(|id| !id.is_empty())
            .collect()
    }

    /// `service`'s time in syscall `name` (the syscall signal).
    pub fn syscall_ns(&self, service: &str, name: &str) -> i64 {
        self.sum("syscall", |s| {
            label(s, "service") == service && label(s, "syscall") == name
        })
    }

    /// `service`'s block I/O time per device (the disk signal).
    pub fn disk_by_device(&self, service: &str) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        let Some(index) = self
            .profile
            .sample_types
            .iter()
            .position(|t| t.kind == "disk_io")
        else {
            return out;
        };
        for sample in &self.profile.samples {
            if label(sample, "service") == service {
                *out.entry(label(sample, "device").to_owned()).or_default() +=
                    sample.values.get(index).copied().unwrap_or(0);
            }
        }
        out
    }
}
