//! An embedded Kubernetes API server for tests (SPEC §10).
//!
//! It speaks the real REST protocol over HTTP on 127.0.0.1, so kube-rs clients, the
//! `stratos` binary and kubectl connect to it unchanged. Fidelity to kube-apiserver matters
//! more than breadth; what is and is not modelled is listed in `testkit/README.md`.

mod patch;
mod resources;
mod selectors;
mod store;

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, body::Frame, body::Incoming, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::broadcast, task::JoinHandle};

pub use patch::{ListStrategy, builtin_list_strategy, merge_patch, strategic_merge_patch};
pub use resources::ResourceDef;
pub use selectors::{FieldSelector, LabelSelector};
pub use store::now_rfc3339 as now;
use store::{ApiError, Change, ChangeKind, Store, Target};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Server options.
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Changes kept per resource for watches; older watches get 410 Gone.
    pub history_limit: usize,
    /// Interval of watch bookmarks for clients that ask for them.
    pub bookmark_interval: Duration,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        Self {
            history_limit: 20_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// One request, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub method: String,
    pub path: String,
    pub query: String,
    pub code: u16,
    /// The client's User-Agent header (Stratos sends `stratos/<version>`).
    pub user_agent: String,
}

struct Shared {
    audit: Mutex<Vec<AuditEntry>>,
    defs: Vec<Arc<ResourceDef>>,
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    close_watches: tokio::sync::watch::Sender<u64>,
    options: ApiServerOptions,
    /// The server is "down": connections are dropped without an answer.
    down: std::sync::atomic::AtomicBool,
    faults: Mutex<Vec<Fault>>,
}

/// An injected answer: requests with this verb on this resource get `code` instead of
/// being served, `count` times (`None`: until [`ApiServer::clear_faults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// Plural, with a subresource after a slash as RBAC spells it: `nodes`, `pods/eviction`.
    pub resource: String,
    pub code: u16,
    pub count: Option<usize>,
}

impl Fault {
    fn error(&self, route: &Route) -> ApiError {
        let name = route.name.clone().unwrap_or_default();
        let plural = &route.def.plural;
        match self.code {
            409 => ApiError::conflict(&route.def, &name),
            403 => ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{plural} \"{name}\" is forbidden: User \"stratos\" cannot {} resource \"{}\" in API group \"{}\"",
                    self.verb, self.resource, route.def.group
                ),
            ),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            503 => ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            code => ApiError::new(
                code,
                "InternalError",
                "an error on the server has prevented the request from succeeding",
            ),
        }
    }
}

pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    dir: PathBuf,
}

impl ApiServer {
    /// Starts a server with the built-in kinds and the given CRDs, and the namespaces
    /// `default`, `kube-system` and `kube-node-lease`.
    pub async fn start(crds: &[CustomResourceDefinition]) -> ApiServer {
        Self::start_with(crds, ApiServerOptions::default()).await
    }

    pub async fn start_with(
        crds: &[CustomResourceDefinition],
        options: ApiServerOptions,
    ) -> ApiServer {
        let mut defs: Vec<Arc<ResourceDef>> =
            resources::builtins().into_iter().map(Arc::new).collect();
        defs.extend(crds.iter().map(|c| Arc::new(ResourceDef::from_crd(c))));
        let (changes, _) = broadcast::channel(65_536);
        let (close_watches, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            audit: Mutex::new(Vec::new()),
            defs,
            store: Mutex::new(Store::new(options.history_limit)),
            changes,
            close_watches,
            options,
            down: Default::default(),
            faults: Mutex::new(Vec::new()),
        });
        for ns in ["default", "kube-system", "kube-node-lease"] {
            let def = shared.def("", "namespaces").expect("namespaces");
            let (_, change) = shared
                .store
                .lock()
                .unwrap()
                .create(
                    &def,
                    "",
                    json!({"metadata": {"name": ns}, "status": {"phase": "Active"}}),
                )
                .expect("fresh namespace");
            let _ = shared.changes.send(change);
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let served = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                if served.is_down() {
                    // Like a restarting server: the connection goes without an answer.
                    drop(stream);
                    continue;
                }
                let shared = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let shared = shared.clone();
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let query = req.uri().query().unwrap_or("").to_owned();
                        let user_agent = req
                            .headers()
                            .get(http::header::USER_AGENT)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        async move {
                            if shared.is_down() {
                                // Ends the connection without a response.
                                return Err(std::io::Error::other("API server down"));
                            }
                            let response = handle(shared.clone(), req).await;
                            let code = response.status().as_u16();
                            shared.audit.lock().unwrap().push(AuditEntry {
                                method,
                                path,
                                query,
                                code,
                                user_agent,
                            });
                            Ok::<_, std::io::Error>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let dir = std::env::temp_dir().join(format!(
            "stratos-testkit-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = ApiServer {
            addr,
            shared,
            task,
            dir,
        };
        std::fs::write(server.kubeconfig_path(), server.kubeconfig_yaml())
            .expect("write kubeconfig");
        server
    }

    /// Starts a server serving the CRDs committed in `<repo>/crds/`.
    pub async fn start_with_repo_crds() -> ApiServer {
        Self::start(&repo_crds()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testkit\n  cluster:\n    server: {}\n\
             users:\n- name: testkit\n  user:\n    token: testkit\ncontexts:\n- name: testkit\n  context:\n    cluster: testkit\n    user: testkit\n    namespace: default\n\
             current-context: testkit\n",
            self.url()
        )
    }

    /// A kubeconfig file for the `stratos` binary or kubectl.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A client for this server, configured like a default in-cluster client.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("client for the embedded API server")
    }

    /// A client that does not retry 429/503/504 by itself, so a PDB-blocked eviction
    /// answers at once instead of after minutes of hidden retries.
    pub fn client_without_retry(&self) -> kube::Client {
        let mut config = self.config();
        config.default_retry = false;
        kube::Client::try_from(config).expect("client for the embedded API server")
    }

    pub fn config(&self) -> kube::Config {
        let uri: http::Uri = self.url().parse().expect("url");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        config.read_timeout = Some(Duration::from_secs(300));
        config
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    pub fn close_all_watches(&self) {
        self.shared.close_watches.send_modify(|v| *v += 1);
    }

    /// Takes the server down (`true`) or brings it back: while down, every open watch ends
    /// and every connection is dropped without an answer, as during a kube-apiserver
    /// restart. The objects are kept, as etcd keeps them.
    pub fn set_down(&self, down: bool) {
        self.shared
            .down
            .store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.close_all_watches();
        }
    }

    /// The next `count` `verb` requests on `resource` (e.g. `patch`, `nodes`) answer `code`.
    pub fn fail_next(&self, verb: &str, resource: &str, code: u16, count: usize) {
        self.inject(verb, resource, code, Some(count));
    }

    /// Every `verb` request on `resource` answers 403 Forbidden until
    /// [`ApiServer::clear_faults`], as when RBAC lacks the permission.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inject(verb, resource, 403, None);
    }

    fn inject(&self, verb: &str, resource: &str, code: u16, count: Option<usize>) {
        self.shared.faults.lock().unwrap().push(Fault {
            verb: verb.into(),
            resource: resource.into(),
            code,
            count,
        });
    }

    pub fn clear_faults(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    /// Drops all watch history: watches from any earlier version now get 410 Gone.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    /// A synchronous reader of the current resourceVersion (for the invariant checks).
    pub fn resource_version_probe(&self) -> crate::invariants::ResourceVersionProbe {
        let shared = self.shared.clone();
        Arc::new(move || shared.store.lock().unwrap().resource_version())
    }

    /// Every request served so far.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.shared.audit.lock().unwrap().clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.close_all_watches();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CRDs committed in the repository's `crds/` directory.
pub fn repo_crds() -> Vec<CustomResourceDefinition> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            serde_yaml::from_str(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect()
}

impl Shared {
    fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The injected fault this request meets, if any (consuming one of its count).
    fn fault(&self, verb: &str, route: &Route) -> Option<ApiError> {
        let resource = match &route.subresource {
            Some(sub) => format!("{}/{sub}", route.def.plural),
            None => route.def.plural.clone(),
        };
        let mut faults = self.faults.lock().unwrap();
        let i = faults
            .iter()
            .position(|f| f.verb == verb && f.resource == resource)?;
        let error = faults[i].error(route);
        if let Some(n) = faults[i].count.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        Some(error)
    }

    fn def(&self, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.plural == plural)
            .cloned()
    }

    fn publish(&self, change: Option<Arc<Change>>) {
        if let Some(c) = change {
            let _ = self.changes.send(c);
        }
    }
}

/// A parsed resource path.
struct Route {
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_route(shared: &Shared, path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return Err(not_found()),
    };
    let version_ok = |d: &ResourceDef| match segments.as_slice() {
        ["apis", _, version, ..] => d.version == *version,
        _ => true,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if shared.def(group, plural).is_some_and(|d| d.namespaced) =>
        {
            (Some(ns.to_string()), [&[*plural][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(not_found()),
    };
    let def = shared
        .def(group, plural)
        .filter(|d| version_ok(d))
        .ok_or_else(not_found)?;
    if let Some(sub) = &sub {
        let allowed = (sub == "status" && def.status_subresource)
            || (def.kind == "Pod"
                && def.group.is_empty()
                && (sub == "eviction" || sub == "binding"));
        if !allowed {
            return Err(not_found());
        }
    }
    Ok(Route {
        def,
        namespace,
        name,
        subresource: sub,
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed_unsync())
        .unwrap()
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn success_status(code: u16) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code})
}

/// `Accept: ...;as=PartialObjectMetadata[List]` asks for metadata only.
fn wants_metadata(req_accept: &str) -> bool {
    req_accept.contains("as=PartialObjectMetadata")
}

fn as_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path == "/version" {
        return json_response(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-stratos-testkit", "gitCommit": "testkit",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a",
                "compiler": "rustc", "platform": "linux/amd64"
            }),
        );
    }
    if path == "/healthz" || path == "/readyz" || path == "/livez" {
        return Response::builder()
            .status(200)
            .body(Full::new(Bytes::from_static(b"ok")).boxed_unsync())
            .unwrap();
    }
    if req.method() == Method::GET
        && let Some(doc) = resources::discovery(&shared.defs, &path)
    {
        return json_response(200, &doc);
    }
    let route = match parse_route(&shared, &path) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let accept = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let watch = query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, route.name.is_some()) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "",
    };
    if let Some(e) = shared.fault(verb, &route) {
        return error_response(&e);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let result = match (method, route.name.is_some(), route.subresource.as_deref()) {
        (Method::GET, false, None) => {
            if watch {
                return watch_response(shared, route, &query, wants_metadata(&accept));
            }
            list(&shared, &route, &query, representation(&accept))
        }
        (Method::GET, true, sub) if sub.is_none() || sub == Some("status") => {
            get(&shared, &route, representation(&accept))
        }
        (Method::POST, false, None) => create(&shared, &route, &body),
        (Method::POST, true, Some("binding")) => bind(&shared, &route, &body),
        (Method::POST, true, Some("eviction")) => evict(&shared, &route, &body),
        (Method::PUT, true, sub) if sub.is_none() || sub == Some("status") => {
            update(&shared, &route, &body)
        }
        (Method::PATCH, true, sub) if sub.is_none() || sub == Some("status") => {
            patch_object(&shared, &route, &query, &content_type, &body)
        }
        (Method::DELETE, true, None) => delete(&shared, &route, &query, &body),
        (Method::DELETE, false, None) => delete_collection(&shared, &route, &query),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    match result {
        Ok((code, value)) => json_response(code, &value),
        Err(e) => error_response(&e),
    }
}

type Handled = Result<(u16, Value), ApiError>;

fn ns_of(route: &Route) -> String {
    route.namespace.clone().unwrap_or_default()
}

fn check_namespace(shared: &Shared, route: &Route) -> Result<(), ApiError> {
    if !route.def.namespaced {
        return Ok(());
    }
    let ns = route
        .namespace
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
    let ns_def = shared.def("", "namespaces").expect("namespaces");
    if shared.store.lock().unwrap().get(&ns_def, "", ns).is_none() {
        return Err(ApiError::not_found(&ns_def, ns));
    }
    Ok(())
}

fn get(shared: &Shared, route: &Route, repr: Representation) -> Handled {
    let name = route.name.as_deref().unwrap_or_default();
    let store = shared.store.lock().unwrap();
    let obj = store
        .get(&route.def, &ns_of(route), name)
        .ok_or_else(|| ApiError::not_found(&route.def, name))?;
    let body = match repr {
        Representation::Metadata => as_metadata(obj),
        Representation::Table => resources::table(&route.def, &[obj], store.resource_version()),
        Representation::Full => obj.clone(),
    };
    Ok((200, body))
}

fn selectors(route: &Route, query: &str) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(&query_param(query, "labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(
        &query_param(query, "fieldSelector").unwrap_or_default(),
        &route.def.supported_fields(),
    )
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// What representation the client asked for in `Accept`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Representation {
    Full,
    Metadata,
    Table,
}

fn representation(accept: &str) -> Representation {
    if accept.contains("as=Table") {
        Representation::Table
    } else if wants_metadata(accept) {
        Representation::Metadata
    } else {
        Representation::Full
    }
}

fn list(shared: &Shared, route: &Route, query: &str, repr: Representation) -> Handled {
    let metadata_only = repr == Representation::Metadata;
    let (labels, fields) = selectors(route, query)?;
    let limit: usize = query_param(query, "limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let after = query_param(query, "continue").filter(|c| !c.is_empty());
    let store = shared.store.lock().unwrap();
    let rv = store.resource_version();
    let ns = if route.def.namespaced {
        route.namespace.as_deref()
    } else {
        None
    };
    let key_of = |o: &Value| {
        format!(
            "{}/{}",
            o.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(""),
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
        )
    };
    let matching = store
        .list(&route.def, ns)
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter(|o| after.as_ref().is_none_or(|a| key_of(o) > *a));
    let mut items = Vec::new();
    let mut next = None;
    for o in matching {
        if items.len() == limit {
            next = items.last().map(|l: &Value| key_of(l));
            break;
        }
        items.push(o.clone());
    }
    // Kept in the wire form: a plain key; clients treat it as opaque.
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(next) = next {
        meta["continue"] = json!(next);
    }
    if repr == Representation::Table {
        let refs: Vec<&Value> = items.iter().collect();
        let mut table = resources::table(&route.def, &refs, rv);
        if let Some(c) = meta.get("continue") {
            table["metadata"]["continue"] = c.clone();
        }
        return Ok((200, table));
    }
    let (kind, api_version, items) = if metadata_only {
        (
            "PartialObjectMetadataList".to_owned(),
            "meta.k8s.io/v1".to_owned(),
            items.iter().map(as_metadata).collect(),
        )
    } else {
        (
            format!("{}List", route.def.kind),
            route.def.api_version(),
            items,
        )
    };
    Ok((
        200,
        json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}),
    ))
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn create(shared: &Shared, route: &Route, body: &[u8]) -> Handled {
    check_namespace(shared, route)?;
    let obj = parse_body(body)?;
    let (obj, change) = shared
        .store
        .lock()
        .unwrap()
        .create(&route.def, &ns_of(route), obj)
        .map(|(o, c)| {
            shared.publish(Some(c.clone()));
            (o, c)
        })?;
    drop(change);
    Ok((201, obj))
}

fn target(route: &Route) -> Target {
    if route.subresource.as_deref() == Some("status") {
        Target::Status
    } else {
        Target::Main
    }
}

fn update(shared: &Shared, route: &Route, body: &[u8]) -> Handled {
    let body = parse_body(body)?;
    let name = route.name.as_deref().unwrap_or_default();
    let mut store = shared.store.lock().unwrap();
    let (obj, change) = store.update(&route.def, &ns_of(route), name, body, target(route), true)?;
    shared.publish(change);
    Ok((200, obj))
}

fn patch_object(
    shared: &Shared,
    route: &Route,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> Handled {
    let name = route.name.as_deref().unwrap_or_default().to_owned();
    let ns = ns_of(route);
    let media = content_type.split(';').next().unwrap_or("").trim();
    let mut store = shared.store.lock().unwrap();
    if media == "application/apply-patch+yaml" || media == "application/apply-patch+cbor" {
        let manager = query_param(query, "fieldManager")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ApiError::bad_request("PATCH, application/apply-patch+yaml: fieldManager is required for apply requests"))?;
        let force = query_param(query, "force").is_some_and(|f| f == "true");
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
        let applied: Value = serde_yaml::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        drop(store);
        check_namespace(shared, route)?;
        let mut store = shared.store.lock().unwrap();
        let (obj, change) = store.apply(
            &route.def,
            &ns,
            &name,
            applied,
            &manager,
            force,
            target(route),
        )?;
        let created = change.as_ref().is_some_and(|c| c.kind == ChangeKind::Added);
        shared.publish(change);
        return Ok((if created { 201 } else { 200 }, obj));
    }
    let existing = store
        .get(&route.def, &ns, &name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&route.def, &name))?;
    let patch_doc = parse_body(body)?;
    let mut patched = existing.clone();
    match media {
        "application/merge-patch+json" => merge_patch(&mut patched, &patch_doc),
        "application/json-patch+json" => {
            // kube-apiserver's JSON patch (evanphx/json-patch) treats a missing path as null
            // in a `test` op; kube-rs' finalizer helper relies on that ("no finalizers yet").
            let ops_json: Vec<Value> = patch_doc
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|op| {
                    let null_test = op.get("op").and_then(Value::as_str) == Some("test")
                        && op.get("value").is_some_and(Value::is_null);
                    let missing = op
                        .get("path")
                        .and_then(Value::as_str)
                        .is_some_and(|p| patched.pointer(p).is_none());
                    !(null_test && missing)
                })
                .collect();
            let ops: json_patch::Patch = serde_json::from_value(Value::Array(ops_json))
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut patched, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
        }
        "application/strategic-merge-patch+json" => {
            if !route.def.strategic_merge {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                ));
            }
            strategic_merge_patch(&mut patched, &patch_doc, "").map_err(ApiError::bad_request)?;
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - {other}"),
            ));
        }
    }
    // A patch that names a resourceVersion is a precondition; otherwise it applies to the
    // current object.
    let requested_rv = patched
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let current_rv = existing
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if (patch_doc.pointer("/metadata/resourceVersion").is_none() || requested_rv == current_rv)
        && let Some(m) = patched.get_mut("metadata").and_then(Value::as_object_mut)
    {
        m.insert(
            "resourceVersion".into(),
            json!(current_rv.unwrap_or_default()),
        );
    }
    let (obj, change) = store.update(&route.def, &ns, &name, patched, target(route), false)?;
    shared.publish(change);
    Ok((200, obj))
}

fn delete(shared: &Shared, route: &Route, query: &str, body: &[u8]) -> Handled {
    let name = route.name.as_deref().unwrap_or_default();
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).unwrap_or(json!({}))
    };
    let grace = query_param(query, "gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_i64));
    let precondition = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str);
    let mut store = shared.store.lock().unwrap();
    let (obj, change) = store.delete(&route.def, &ns_of(route), name, grace, precondition)?;
    shared.publish(change);
    Ok((200, obj))
}

fn delete_collection(shared: &Shared, route: &Route, query: &str) -> Handled {
    let (labels, fields) = selectors(route, query)?;
    let mut store = shared.store.lock().unwrap();
    let ns = if route.def.namespaced {
        route.namespace.as_deref()
    } else {
        None
    };
    let targets: Vec<(String, String)> = store
        .list(&route.def, ns)
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .map(|o| {
            (
                o.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                o.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    let mut items = Vec::new();
    for (ns, name) in targets {
        if let Ok((obj, change)) = store.delete(&route.def, &ns, &name, None, None) {
            shared.publish(change);
            items.push(obj);
        }
    }
    Ok((
        200,
        json!({"kind": format!("{}List", route.def.kind), "apiVersion": route.def.api_version(), "metadata": {}, "items": items}),
    ))
}

fn bind(shared: &Shared, route: &Route, body: &[u8]) -> Handled {
    let binding = parse_body(body)?;
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("binding target name is required"))?
        .to_owned();
    let name = route.name.as_deref().unwrap_or_default();
    let ns = ns_of(route);
    let mut store = shared.store.lock().unwrap();
    let pod = store
        .get(&route.def, &ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&route.def, name))?;
    if let Some(current) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{current}\""
            ),
        ));
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("pod {name} is being deleted, cannot be assigned to a host"),
        ));
    }
    let mut new = pod.clone();
    new["spec"]["nodeName"] = json!(node);
    strategic_merge_patch(
        &mut new,
        &json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": store::now_rfc3339()}]}}),
        "",
    )
    .map_err(ApiError::bad_request)?;
    // Binding is the one write that changes both spec.nodeName and status: the status write
    // starts from the object the first write produced, so the pair is consistent.
    let (after, change) =
        store.update(&route.def, &ns, name, new.clone(), Target::Binding, false)?;
    shared.publish(change);
    let mut with_status = after;
    with_status["status"] = new["status"].clone();
    let (_, change) = store.update(&route.def, &ns, name, with_status, Target::Status, false)?;
    shared.publish(change);
    Ok((201, success_status(201)))
}

fn int_or_percent(v: &Value, total: i64, round_up: bool) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let pct: f64 = s.strip_suffix('%')?.parse().ok()?;
            let exact = pct * total as f64 / 100.0;
            Some(if round_up {
                exact.ceil() as i64
            } else {
                exact.floor() as i64
            })
        }
        _ => None,
    }
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The eviction subresource: allowed unless a PodDisruptionBudget would be violated.
/// Disruptions allowed are computed from the pods' readiness at request time (the
/// disruption controller's job in a real cluster).
fn evict(shared: &Shared, route: &Route, body: &[u8]) -> Handled {
    let eviction = if body.is_empty() {
        json!({})
    } else {
        parse_body(body)?
    };
    let name = route.name.as_deref().unwrap_or_default();
    let ns = ns_of(route);
    let mut store = shared.store.lock().unwrap();
    let pod = store
        .get(&route.def, &ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&route.def, name))?;
    let terminal = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
    if !terminal && !deleting {
        let pdb_def = shared.def("policy", "poddisruptionbudgets").expect("pdb");
        let pods: Vec<Value> = store
            .list(&route.def, Some(&ns))
            .into_iter()
            .cloned()
            .collect();
        let matching_pdbs: Vec<Value> = store
            .list(&pdb_def, Some(&ns))
            .into_iter()
            .filter(|pdb| label_selector_matches(pdb.pointer("/spec/selector"), &pod))
            .cloned()
            .collect();
        if matching_pdbs.len() > 1 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some(pdb) = matching_pdbs.first() {
            let selected: Vec<&Value> = pods
                .iter()
                .filter(|p| label_selector_matches(pdb.pointer("/spec/selector"), p))
                .filter(|p| {
                    !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded" | "Failed")
                    )
                })
                .collect();
            let expected = selected.len() as i64;
            let healthy = selected
                .iter()
                .filter(|p| pod_ready(p) && p.pointer("/metadata/deletionTimestamp").is_none())
                .count() as i64;
            let desired = if let Some(min) = pdb.pointer("/spec/minAvailable") {
                int_or_percent(min, expected, true).unwrap_or(0)
            } else if let Some(max) = pdb.pointer("/spec/maxUnavailable") {
                (expected - int_or_percent(max, expected, true).unwrap_or(0)).max(0)
            } else {
                0
            };
            let allowed = if pod_ready(&pod) {
                healthy - desired >= 1
            } else {
                healthy >= desired
            };
            if !allowed {
                let pdb_name = pdb
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                e.details = Some(
                    json!({"causes": [{"reason": "DisruptionBudget", "message": format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently")}]}),
                );
                return Err(e);
            }
        }
    }
    let grace = eviction
        .pointer("/deleteOptions/gracePeriodSeconds")
        .and_then(Value::as_i64);
    let (_, change) = store.delete(&route.def, &ns, name, grace, None)?;
    shared.publish(change);
    Ok((201, success_status(201)))
}

/// A `metav1.LabelSelector` (matchLabels + matchExpressions) against an object's labels.
pub fn label_selector_matches(selector: Option<&Value>, obj: &Value) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    let labels = obj.pointer("/metadata/labels");
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let match_labels = selector.get("matchLabels").and_then(Value::as_object);
    let labels_ok = match_labels.is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let exprs_ok = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|exprs| {
            exprs.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or("");
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                match e["operator"].as_str() {
                    Some("In") => get(key).is_some_and(|v| values.contains(&v)),
                    Some("NotIn") => get(key).is_none_or(|v| !values.contains(&v)),
                    Some("Exists") => get(key).is_some(),
                    Some("DoesNotExist") => get(key).is_none(),
                    _ => false,
                }
            })
        });
    labels_ok && exprs_ok
}

struct WatchState {
    shared: Arc<Shared>,
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    metadata_only: bool,
    bookmarks: bool,
    replay: VecDeque<Value>,
    last_rv: u64,
    receiver: broadcast::Receiver<Arc<Change>>,
    closer: tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    done: bool,
}

impl WatchState {
    fn selected(&self, obj: &Value) -> bool {
        let ns_ok = match &self.namespace {
            Some(ns) if self.def.namespaced => {
                obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
            }
            _ => true,
        };
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The watch event a change produces for this watcher, if any.
    fn event_for(&self, change: &Change) -> Option<Value> {
        if change.resource != self.def.qualified() || change.rv <= self.last_rv {
            return None;
        }
        let now = self.selected(&change.object);
        let before = change.old.as_ref().is_some_and(|o| self.selected(o));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Added, _, true) => "ADDED",
            (ChangeKind::Modified, true, true) => "MODIFIED",
            (ChangeKind::Modified, false, true) => "ADDED",
            (ChangeKind::Modified, true, false) => "DELETED",
            (ChangeKind::Deleted, _, true) | (ChangeKind::Deleted, true, _) => "DELETED",
            _ => return None,
        };
        let object = if self.metadata_only {
            as_metadata(&change.object)
        } else {
            change.object.clone()
        };
        Some(json!({"type": kind, "object": object}))
    }

    fn bookmark(&self) -> Value {
        let rv = self.shared.store.lock().unwrap().resource_version();
        let kind = if self.metadata_only {
            "PartialObjectMetadata".to_owned()
        } else {
            self.def.kind.clone()
        };
        let api_version = if self.metadata_only {
            "meta.k8s.io/v1".to_owned()
        } else {
            self.def.api_version()
        };
        json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}})
    }
}

fn line(v: &Value) -> Frame<Bytes> {
    let mut bytes = serde_json::to_vec(v).unwrap();
    bytes.push(b'\n');
    Frame::data(Bytes::from(bytes))
}

fn watch_response(
    shared: Arc<Shared>,
    route: Route,
    query: &str,
    metadata_only: bool,
) -> Response<Body> {
    let (labels, fields) = match selectors(&route, query) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let requested: Option<u64> = query_param(query, "resourceVersion")
        .filter(|r| !r.is_empty())
        .and_then(|r| r.parse().ok());
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let bookmarks = query_param(query, "allowWatchBookmarks").is_some_and(|b| b == "true");
    let namespace = if route.def.namespaced {
        route.namespace.clone()
    } else {
        None
    };

    // Subscribe while holding the store lock, so no change falls between replay and live.
    let store = shared.store.lock().unwrap();
    let receiver = shared.changes.subscribe();
    let mut state = WatchState {
        shared: shared.clone(),
        def: route.def.clone(),
        namespace,
        labels,
        fields,
        metadata_only,
        bookmarks,
        replay: VecDeque::new(),
        last_rv: 0,
        receiver,
        closer: shared.close_watches.subscribe(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        done: false,
    };
    match requested {
        // No version (or "0"): the current state as ADDED events, then changes.
        None | Some(0) => {
            let ns = state.namespace.clone();
            for obj in store.list(&route.def, ns.as_deref()) {
                if state.selected(obj) {
                    let object = if metadata_only {
                        as_metadata(obj)
                    } else {
                        obj.clone()
                    };
                    state
                        .replay
                        .push_back(json!({"type": "ADDED", "object": object}));
                }
            }
            state.last_rv = store.resource_version();
        }
        Some(rv) => match store.history_since(&route.def, rv) {
            Ok(changes) => {
                state.last_rv = rv;
                for change in changes {
                    if let Some(event) = state.event_for(&change) {
                        state.replay.push_back(event);
                    }
                    state.last_rv = change.rv;
                }
                state.last_rv = state.last_rv.max(store.resource_version());
            }
            Err(e) => {
                // Like kube-apiserver: 200, then one ERROR event carrying the 410 Status.
                state
                    .replay
                    .push_back(json!({"type": "ERROR", "object": e.status()}));
                state.done = true;
            }
        },
    }
    drop(store);

    let interval = shared.options.bookmark_interval;
    let stream = futures::stream::unfold(state, move |mut st| async move {
        if let Some(event) = st.replay.pop_front() {
            return Some((line(&event), st));
        }
        if st.done {
            return None;
        }
        loop {
            let bookmark_at = tokio::time::sleep(interval);
            tokio::select! {
                received = st.receiver.recv() => match received {
                    Ok(change) => {
                        if let Some(event) = st.event_for(&change) {
                            st.last_rv = change.rv;
                            return Some((line(&event), st));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow to keep up: end with 410 so the client relists.
                        st.done = true;
                        let e = ApiError::new(410, "Expired", "watch channel overflowed; relist");
                        return Some((line(&json!({"type": "ERROR", "object": e.status()})), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = bookmark_at, if st.bookmarks => {
                    let event = st.bookmark();
                    return Some((line(&event), st));
                }
                _ = st.closer.changed() => return None,
                _ = tokio::time::sleep_until(st.deadline) => return None,
            }
        }
    });
    let body = StreamBody::new(stream.map(Ok::<_, Infallible>));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed_unsync(body))
        .unwrap()
}
