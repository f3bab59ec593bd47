//! Start-up checks of `stratos run`: reach the API server, find our CRDs, build the EC2
//! client. Each failure names what is wrong and how to fix it, instead of a controller
//! failing later with a 404 buried in a retry loop.

use std::time::Duration;

use kube::{Api, Client, Resource, api::ListParams};

use crate::{
    api::{AWSNodeClass, NodePool},
    cloud::ec2,
    config::RunConfig,
};

const API_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("cannot load a Kubernetes configuration (in-cluster or KUBECONFIG): {0}")]
    KubeConfig(String),
    #[error("cannot reach the Kubernetes API server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "the {kind} CRD ({crd}) is not installed: run `stratos crds | kubectl apply -f -` or install the Helm chart"
    )]
    CrdMissing { kind: String, crd: String },
    #[error("cannot list {kind} objects: {reason}")]
    CrdUnusable { kind: String, reason: String },
    #[error(transparent)]
    Aws(#[from] ec2::Ec2ConfigError),
}

/// What a successful preflight hands to the operator.
pub struct Clients {
    pub kube: Client,
    /// Without kube's built-in 429 retries, for evictions.
    pub eviction: Client,
    pub aws: aws_config::SdkConfig,
}

/// The User-Agent of every Stratos request, so API server audit logs name the operator.
pub const USER_AGENT: &str = concat!("stratos/", env!("CARGO_PKG_VERSION"));

/// Marks a client configuration as Stratos' own (see [`USER_AGENT`]).
pub fn identify(config: &mut kube::Config) {
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
}

pub async fn connect(cfg: &RunConfig) -> Result<Clients, PreflightError> {
    // Local configuration first: it needs no network, so its errors come before any timeout.
    let aws =
        ec2::sdk_config_from_env(cfg.region.as_deref(), cfg.aws_endpoint_url.as_deref()).await?;

    let mut config = kube::Config::infer()
        .await
        .map_err(|e| PreflightError::KubeConfig(e.to_string()))?;
    identify(&mut config);
    let url = config.cluster_url.to_string();
    let mut eviction_config = config.clone();
    eviction_config.default_retry = false;
    let client = Client::try_from(config).map_err(|e| PreflightError::KubeConfig(e.to_string()))?;
    let eviction =
        Client::try_from(eviction_config).map_err(|e| PreflightError::KubeConfig(e.to_string()))?;

    let unreachable = |reason: String| PreflightError::Unreachable {
        url: url.clone(),
        reason,
    };
    let version = tokio::time::timeout(API_TIMEOUT, client.apiserver_version())
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", API_TIMEOUT.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
    tracing::info!(server = %url, version = %version.git_version, "connected to the Kubernetes API server");

    check_crd::<AWSNodeClass>(&client).await?;
    check_crd::<NodePool>(&client).await?;
    Ok(Clients {
        kube: client,
        eviction,
        aws,
    })
}

/// A list with `limit=1` is the cheapest request that proves the CRD is served and that our
/// RBAC can read it.
async fn check_crd<K>(client: &Client) -> Result<(), PreflightError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).into_owned();
    let api: Api<K> = Api::all(client.clone());
    let result = tokio::time::timeout(
        API_TIMEOUT,
        api.list_metadata(&ListParams::default().limit(1)),
    )
    .await;
    match result {
        Err(_) => Err(PreflightError::CrdUnusable {
            kind,
            reason: format!("no answer within {}s", API_TIMEOUT.as_secs()),
        }),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(status))) if status.is_not_found() => {
            Err(PreflightError::CrdMissing {
                kind,
                crd: format!("{}.{}", K::plural(&()), K::group(&())),
            })
        }
        Ok(Err(e)) => Err(PreflightError::CrdUnusable {
            kind,
            reason: e.to_string(),
        }),
    }
}
