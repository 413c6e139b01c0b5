//! A small keep-alive HTTP/1.1 client (hyper) for the gateway and `/metrics`.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled client; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client whose every request gives up after `timeout`.
    pub(super) fn new(timeout: Duration) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpClient { inner, timeout }
    }

    /// `GET url` → status and body.
    pub(super) async fn get(&self, url: &str) -> anyhow::Result<(u16, Bytes)> {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .with_context(|| format!("bad URL {url}"))?;
        self.send(req).await
    }

    /// `POST url` with a JSON body → status and body.
    pub(super) async fn post_json(&self, url: &str, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
        let req = Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .with_context(|| format!("bad URL {url}"))?;
        self.send(req).await
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        let uri = req.uri().clone();
        let work = async {
            let resp = self.inner.request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .with_context(|| format!("{uri}: no answer within {:?}", self.timeout))?
            .with_context(|| format!("{uri}"))
    }
}
