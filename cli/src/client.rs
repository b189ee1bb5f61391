//! The connection to the collector: TLS (verifying the collector against `--ca`) or
//! plaintext, the bearer token on every call, and gRPC failures turned into messages a
//! person can act on.

use std::time::Duration;

use anyhow::Context as _;
use stallscope_proto::v1::{self, query_client::QueryClient};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig},
};

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
}

pub async fn connect(connection: &Connection) -> anyhow::Result<Collector> {
    let address = connection.collector.clone();
    let mut endpoint = Channel::from_shared(address.clone())
        .map_err(|_| {
            anyhow::anyhow!(
                "invalid collector address `{address}`: use https://HOST:PORT or http://HOST:PORT"
            )
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(300));
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
    let channel = endpoint.connect().await.map_err(|err| {
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            reason = format!("{reason}: {cause}");
            source = cause.source();
        }
        anyhow::anyhow!(
            "cannot reach the collector at {address} ({reason}); is stallscope-collector running there? set --collector or STALLSCOPE_COLLECTOR"
        )
    })?;
    let token =
        match &connection.token {
            Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(
                |_| anyhow::anyhow!("the token contains characters that cannot go in a header"),
            )?),
            None => None,
        };
    let client = QueryClient::with_interceptor(channel, Bearer(token))
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    Ok(Collector { client, address })
}

/// A failed call as one actionable sentence.
pub fn explain(status: &Status, address: &str) -> anyhow::Error {
    let message = status.message();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow::anyhow!("the collector at {address} refused the query: {message}")
        }
        Code::InvalidArgument => anyhow::anyhow!("the collector rejected the query: {message}"),
        Code::Unavailable => anyhow::anyhow!(
            "the collector at {address} is unavailable: {message}; retry, or check its log"
        ),
        Code::ResourceExhausted => {
            anyhow::anyhow!("the answer is too large ({message}): narrow the time range or filter")
        }
        other => anyhow::anyhow!("query failed ({other:?}): {message}"),
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
