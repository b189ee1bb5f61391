//! The connection to the collector: TLS (verifying the collector against `--ca`) or
//! plaintext, the bearer token on every call, a deadline on connecting and on every call
//! (a port that accepts connections and never answers must not hang the CLI), and gRPC
//! failures turned into messages a person can act on.

use std::time::Duration;

use anyhow::Context as _;
use stallscope_proto::v1::{self, query_client::QueryClient};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::args::{Connection, FilterArgs};

/// Largest response accepted: a day of a busy service is tens of megabytes.
const MAX_RESPONSE_BYTES: usize = 512 * 1024 * 1024;

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

pub type Client = QueryClient<InterceptedService<Channel, Bearer>>;

pub struct Collector {
    pub client: Client,
    pub address: String,
    /// The deadline of one call, for messages.
    pub timeout: Duration,
}

/// `1.5s`, `60s`, `2m`: a deadline as the flags take it.
fn describe(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds >= 60.0 && seconds % 60.0 == 0.0 {
        format!("{}m", seconds / 60.0)
    } else {
        format!("{seconds}s")
    }
}

/// A hint for low-level failures that mean "not a plaintext gRPC server there".
fn protocol_hint(reason: &str, address: &str) -> &'static str {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("h2 protocol error")
        || lower.contains("invalid http version")
        || lower.contains("frame with invalid size")
    {
        if address.starts_with("http://") {
            " (the server there does not speak plaintext gRPC: a collector with TLS needs https:// and --ca; check the port)"
        } else {
            " (the server there does not speak gRPC over TLS: a --plaintext collector needs http://; check the port)"
        }
    } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
        " (the server there does not speak TLS: a --plaintext collector needs http://; check the port)"
    } else if lower.contains("invalid content-type") || lower.contains("text/html") {
        " (an HTTP server answered, not a stallscope collector: check the port)"
    } else {
        ""
    }
}

pub async fn connect(connection: &Connection) -> anyhow::Result<Collector> {
    let address = connection.collector.clone();
    let mut endpoint = Channel::from_shared(address.clone())
        .map_err(|_| {
            anyhow::anyhow!(
                "invalid collector address `{address}`: use https://HOST:PORT or http://HOST:PORT"
            )
        })?
        .connect_timeout(connection.connect_timeout)
        .timeout(connection.timeout);
    if address.starts_with("https://") {
        let ca = connection.ca.as_ref().with_context(|| {
            format!("{address} uses TLS: pass the CA that signed the collector's certificate with --ca or STALLSCOPE_CA")
        })?;
        let pem = std::fs::read(ca)
            .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(name) = &connection.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    } else if !address.starts_with("http://") {
        anyhow::bail!(
            "invalid collector address `{address}`: use https://HOST:PORT or http://HOST:PORT"
        );
    }
    let unreachable = |reason: String| {
        let hint = protocol_hint(&reason, &address);
        anyhow::anyhow!(
            "cannot reach the collector at {address} ({reason}){hint}; is stallscope-collector running there? set --collector or STALLSCOPE_COLLECTOR"
        )
    };
    // The endpoint's own connect timeout covers TCP; this one also bounds the TLS and
    // HTTP/2 handshakes with a server that accepts and then says nothing.
    let channel = match tokio::time::timeout(connection.connect_timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            let mut reason = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !reason.contains(&text) {
                    reason = format!("{reason}: {text}");
                }
                source = cause.source();
            }
            return Err(unreachable(reason));
        }
        Err(_) => {
            return Err(unreachable(format!(
                "no connection within {} (--connect-timeout)",
                describe(connection.connect_timeout)
            )));
        }
    };
    // A server that accepts connections and never answers (a hung collector, another
    // program on the port) would only fail at the query's own deadline; the standard
    // health check answers at once from any live collector.
    let health = tokio::time::timeout(
        connection.connect_timeout,
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await;
    match health {
        Err(_) => {
            anyhow::bail!(
                "the server at {address} accepted the connection but did not answer within {} (--connect-timeout): is a stallscope collector listening there, and is it overloaded?",
                describe(connection.connect_timeout)
            );
        }
        Ok(Err(status)) if status.code() != Code::Unimplemented => {
            let hint = protocol_hint(status.message(), &address);
            anyhow::bail!(
                "the server at {address} did not answer a health check ({}){hint}; is stallscope-collector running there?",
                status.message()
            );
        }
        Ok(_) => {}
    }
    let token =
        match &connection.token {
            Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(
                |_| anyhow::anyhow!("the token contains characters that cannot go in a header"),
            )?),
            None => None,
        };
    let client = QueryClient::with_interceptor(channel, Bearer(token))
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    Ok(Collector {
        client,
        address,
        timeout: connection.timeout,
    })
}

impl Collector {
    /// A failed call as one actionable sentence.
    pub fn explain(&self, status: &Status) -> anyhow::Error {
        explain(status, &self.address, self.timeout)
    }
}

/// A failed call as one actionable sentence.
pub fn explain(status: &Status, address: &str, timeout: Duration) -> anyhow::Error {
    let message = status.message();
    let timed_out = status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled && message.contains("Timeout expired"));
    if timed_out {
        return anyhow::anyhow!(
            "the collector at {address} did not answer within {} (--timeout, or `timeout` in cli.toml): is a stallscope collector listening there, and is it overloaded? a large query may need a longer --timeout",
            describe(timeout)
        );
    }
    let hint = protocol_hint(message, address);
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow::anyhow!("the collector at {address} refused the query: {message}")
        }
        Code::InvalidArgument => anyhow::anyhow!("the collector rejected the query: {message}"),
        Code::Unavailable => anyhow::anyhow!(
            "the collector at {address} is unavailable: {message}{hint}; retry, or check its log"
        ),
        Code::ResourceExhausted => {
            anyhow::anyhow!("the answer is too large ({message}): narrow the time range or filter")
        }
        other => anyhow::anyhow!("query failed ({other:?}): {message}{hint}"),
    }
}

pub fn time_range(from: i64, until: i64) -> v1::TimeRange {
    v1::TimeRange {
        from_unix_ns: from,
        until_unix_ns: until,
    }
}

pub fn filter(args: &FilterArgs) -> anyhow::Result<v1::Filter> {
    let labels = args
        .labels
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--label `{pair}` must be KEY=VALUE"))?;
            Ok(v1::LabelMatch {
                key: key.to_owned(),
                value: value.to_owned(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(v1::Filter {
        host: args.host.clone().unwrap_or_default(),
        service: args.service.clone().unwrap_or_default(),
        pid: args.pid.map(|p| p.to_string()).unwrap_or_default(),
        signal: args.signal.clone().unwrap_or_default(),
        cause: args.cause.clone().unwrap_or_default(),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_mismatches_get_a_hint() {
        let plaintext = protocol_hint("h2 protocol error: http2 error", "http://h:7070");
        assert!(plaintext.contains("needs https://"), "{plaintext}");
        let tls = protocol_hint(
            "transport error: received corrupt message of type InvalidContentType",
            "https://h:7070",
        );
        assert!(tls.contains("needs http://"), "{tls}");
        assert_eq!(protocol_hint("connection refused", "http://h:7070"), "");
        assert_eq!(describe(Duration::from_secs(120)), "2m");
        assert_eq!(describe(Duration::from_millis(1500)), "1.5s");
    }
}
