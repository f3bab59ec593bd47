//! A fault-injecting HTTP proxy in front of an EC2 emulator.
//!
//! moto's EC2 answers instantly, never throttles, never runs out of capacity and ignores
//! ClientToken. This proxy adds those behaviours on the wire, in front of the real SDK
//! client, so `Ec2Cloud`'s error parsing, retries and idempotency are tested end to end:
//!
//! - per EC2 action, the next N requests can be answered with an EC2 error
//!   (`RequestLimitExceeded`, `InsufficientInstanceCapacity`, …) without reaching moto;
//! - or be forwarded and then have their response "lost" (the caller sees a 503), the
//!   ambiguous failure after which only a ClientToken prevents a double launch;
//! - like EC2, a RunInstances that repeats a ClientToken gets the original response back
//!   instead of new instances.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpListener, task::JoinHandle};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this EC2 error; the request never reaches the emulator.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Forward the request, then answer 503 as if the response had been lost.
    LoseResponse,
}

impl Fault {
    pub fn throttle() -> Self {
        Self::Error {
            status: 503,
            code: "RequestLimitExceeded".into(),
            message: "Request limit exceeded.".into(),
        }
    }

    pub fn insufficient_capacity() -> Self {
        Self::Error {
            status: 500,
            code: "InsufficientInstanceCapacity".into(),
            message: "We currently do not have sufficient capacity in the Availability Zone you requested.".into(),
        }
    }
}

#[derive(Default)]
struct ProxyState {
    faults: HashMap<String, VecDeque<Fault>>,
    received: HashMap<String, usize>,
    forwarded: HashMap<String, usize>,
    launches_by_token: HashMap<String, Bytes>,
    bodies: HashMap<String, Vec<String>>,
}

pub struct FaultProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream_port` on 127.0.0.1.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let state = shared.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        handle(req, state.clone(), client.clone(), upstream_port)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy { port, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `times` requests of `action` (e.g. "StartInstances").
    pub fn inject(&self, action: &str, fault: Fault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state
            .faults
            .entry(action.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Requests of `action` that reached the proxy.
    pub fn received(&self, action: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .received
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// The form bodies of every `action` request received, in order.
    pub fn bodies(&self, action: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .bodies
            .get(action)
            .cloned()
            .unwrap_or_default()
    }

    /// Requests of `action` that reached the emulator.
    pub fn forwarded(&self, action: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .forwarded
            .get(action)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

fn ec2_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<ProxyState>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream_port: u16,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).into_owned();
    let action = form_value(&text, "Action").unwrap_or("").to_owned();
    let token = (action == "RunInstances")
        .then(|| form_value(&text, "ClientToken").map(str::to_owned))
        .flatten();

    let fault = {
        let mut st = state.lock().unwrap();
        *st.received.entry(action.clone()).or_default() += 1;
        st.bodies
            .entry(action.clone())
            .or_default()
            .push(text.clone());
        if let Some(saved) = token.as_ref().and_then(|t| st.launches_by_token.get(t)) {
            let saved = saved.clone();
            return Ok(Response::builder()
                .status(200)
                .header("content-type", "text/xml;charset=UTF-8")
                .body(Full::new(saved))
                .unwrap());
        }
        st.faults.get_mut(&action).and_then(VecDeque::pop_front)
    };
    if let Some(Fault::Error {
        status,
        code,
        message,
    }) = &fault
    {
        return Ok(ec2_error(*status, code, message));
    }

    let mut upstream = Request::builder().method(parts.method.clone()).uri(format!(
        "http://127.0.0.1:{upstream_port}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    ));
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let response = match client
        .request(upstream.body(Full::new(body)).unwrap())
        .await
    {
        Ok(r) => r,
        Err(e) => return Ok(ec2_error(502, "InternalError", &format!("proxy: {e}"))),
    };
    let (resp_parts, resp_body) = response.into_parts();
    let resp_body = resp_body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    {
        let mut st = state.lock().unwrap();
        *st.forwarded.entry(action.clone()).or_default() += 1;
        if let (Some(token), StatusCode::OK) = (token, resp_parts.status) {
            st.launches_by_token.insert(token, resp_body.clone());
        }
    }
    if fault == Some(Fault::LoseResponse) {
        return Ok(ec2_error(
            503,
            "ServiceUnavailable",
            "response lost by the fault proxy",
        ));
    }
    Ok(Response::from_parts(resp_parts, Full::new(resp_body)))
}
