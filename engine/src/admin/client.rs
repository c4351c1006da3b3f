//! A small blocking client of the admin API: what the `wasmq` CLI
//! subcommands (and the tests) use to talk to a running broker.

use base64::Engine as _;
use serde_json::Value;

/// A failed admin API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker answered with an error status.
    #[error("{status}: {reason}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The API's `reason` (or the body).
        reason: String,
    },
    /// The request did not get an answer.
    #[error("admin API unreachable: {0}")]
    Transport(String),
}

/// The admin API of one broker.
#[derive(Clone, Debug)]
pub struct AdminClient {
    base: String,
    authorization: String,
    agent: ureq::Agent,
}

/// Percent-encode one path segment (vhost `/` becomes `%2F`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AdminClient {
    /// A request that got no answer: what was dialed, and how to dial
    /// elsewhere (the CLI prints this as its whole error).
    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError::Transport(format!(
            "{} ({e}); is the broker running with its admin API there? Point elsewhere with --url or WASMQ_ADMIN_URL",
            self.base
        ))
    }

    /// The base URL it calls (e.g. `http://127.0.0.1:15672`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A client of `base` (e.g. `http://127.0.0.1:15672`) as `user`.
    /// An `https://` base is verified against the public web roots.
    pub fn new(base: &str, user: &str, password: &str) -> Self {
        Self::build(base, user, password, None)
    }

    /// A client of an `https://` `base` whose certificate is verified
    /// against the CA certificates in `ca_pem` only (a private CA).
    pub fn with_ca(
        base: &str,
        user: &str,
        password: &str,
        ca_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let certs = ureq::tls::parse_pem(ca_pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Transport(format!("CA file: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Transport(
                "CA file: no PEM certificate in it".into(),
            ));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .build();
        Ok(Self::build(base, user, password, Some(tls)))
    }

    fn build(base: &str, user: &str, password: &str, tls: Option<ureq::tls::TlsConfig>) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)));
        if let Some(tls) = tls {
            config = config.tls_config(tls);
        }
        let agent: ureq::Agent = config.build().into();
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            authorization: format!("Basic {token}"),
            agent,
        }
    }

    fn finish(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut r = r.map_err(|e| self.unreachable(e))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            let reason = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Status { status, reason });
        }
        Ok((status, body))
    }

    fn json(body: &[u8]) -> Result<Value, ClientError> {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(body).map_err(|e| ClientError::Transport(format!("bad JSON: {e}")))
    }

    /// GET a JSON document.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .call();
        Self::json(&self.finish(r)?.1)
    }

    /// GET a document as one of the API's response types
    /// ([`super::model`]).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::typed(self.get(path)?)
    }

    /// POST a JSON document; the answer as one of the API's response types.
    pub fn post_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, ClientError> {
        Self::typed(self.post(path, body)?)
    }

    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| {
            ClientError::Transport(format!(
                "unexpected answer (a broker of another version?): {e}"
            ))
        })
    }

    /// GET raw bytes (a plugin's `.wasm`).
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .call();
        Ok(self.finish(r)?.1)
    }

    /// GET a text document (`/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .call();
        Ok(String::from_utf8_lossy(&self.finish(r)?.1).into_owned())
    }

    /// POST a JSON document; the answer's JSON (or null).
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .send_json(body);
        Self::json(&self.finish(r)?.1)
    }

    /// PUT a JSON document; the status (201 created, 204 replaced).
    pub fn put(&self, path: &str, body: &Value) -> Result<u16, ClientError> {
        let r = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .send_json(body);
        Ok(self.finish(r)?.0)
    }

    /// PUT raw bytes (a plugin upload).
    pub fn put_bytes(&self, path: &str, bytes: &[u8]) -> Result<Value, ClientError> {
        let r = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .header("Content-Type", "application/wasm")
            .send(bytes);
        Self::json(&self.finish(r)?.1)
    }

    /// GET a stream of server-sent events (no timeout: it lasts as long as
    /// the broker sends), calling `each(event, data)` for every event until
    /// it returns false or the stream ends; first with event `open` once
    /// the broker has answered (it is subscribed from then on).
    pub fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(&str, &str) -> bool,
    ) -> Result<(), ClientError> {
        use std::io::BufRead;
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .header("Accept", "text/event-stream")
            .config()
            .timeout_global(None)
            .build()
            .call()
            .map_err(|e| self.unreachable(e))?;
        if r.status().as_u16() >= 400 {
            return self.finish(Ok(r)).map(|_| ());
        }
        if !each("open", "") {
            return Ok(());
        }
        let reader = std::io::BufReader::new(r.into_body().into_reader());
        let (mut event, mut data) = (String::from("message"), String::new());
        for line in reader.lines() {
            let line = line.map_err(|e| ClientError::Transport(e.to_string()))?;
            if line.is_empty() {
                if !data.is_empty() && !each(&event, &data) {
                    return Ok(());
                }
                (event, data) = ("message".into(), String::new());
            } else if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        Ok(())
    }

    /// DELETE.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", &self.authorization)
            .call();
        self.finish(r).map(|_| ())
    }
}
