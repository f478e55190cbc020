//! One connection type for a single node and a cluster.

use std::time::Duration;

use anyhow::Context;
use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};

/// A connection to one node or a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum RedisConn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConn {
    pub async fn connect(urls: &[String], timeout: Duration) -> anyhow::Result<RedisConn> {
        Self::connect_tls(urls, None, timeout).await
    }

    /// [`RedisConn::connect`], checking `rediss://` servers against `tls_ca` (PEM; `None`:
    /// the system's trust store).
    pub async fn connect_tls(
        urls: &[String],
        tls_ca: Option<&[u8]>,
        timeout: Duration,
    ) -> anyhow::Result<RedisConn> {
        let certs = tls_ca.map(|ca| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        });
        let fut = async {
            anyhow::Ok(match urls {
                [] => anyhow::bail!("no Redis URL"),
                [one] => {
                    let client = match &certs {
                        Some(c) => redis::Client::build_with_tls(one.as_str(), c.clone()),
                        None => redis::Client::open(one.as_str()),
                    }
                    .with_context(|| format!("bad Redis URL {one:?}"))?;
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1);
                    RedisConn::Single(
                        redis::aio::ConnectionManager::new_with_config(client, cfg).await?,
                    )
                }
                many => {
                    let mut builder = redis::cluster::ClusterClient::builder(many.to_vec());
                    if let Some(c) = &certs {
                        builder = builder.certs(c.clone());
                    }
                    let client = builder
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(2)
                        .build()
                        .context("bad Redis Cluster URLs")?;
                    RedisConn::Cluster(client.get_async_connection().await?)
                }
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to Redis timed out after {timeout:?}"))?
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Sends one pipeline (one round trip on a single node), bounded by `timeout`.
    pub async fn pipe(&mut self, p: &Pipeline, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let fut = async {
            match self {
                RedisConn::Single(c) => p.query_async::<Vec<Value>>(c).await,
                RedisConn::Cluster(c) => p.query_async::<Vec<Value>>(c).await,
            }
        };
        Ok(tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("Redis pipeline timed out after {timeout:?}"))??)
    }

    /// The connection as a `ConnectionLike` (scripts, single commands).
    pub fn as_like(&mut self) -> &mut (dyn ConnectionLike + Send) {
        match self {
            RedisConn::Single(c) => c,
            RedisConn::Cluster(c) => c,
        }
    }
}
