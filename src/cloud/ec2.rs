//! [`CloudProvider`] on EC2 (SPEC §7).
//!
//! Every call goes through [`Ec2Cloud::call`]: it waits for the client-side rate limiter,
//! records a count and a latency, maps the error code to a [`CloudError`] and retries what
//! EC2 says is transient (throttling, 5xx, timeouts) with jittered exponential backoff. The
//! SDK's own retries are off so that this is the single retry policy and every attempt is
//! counted.
//!
//! EC2 rejects a whole Start/Stop/Terminate call when one id is unknown or in the wrong
//! state; [`Ec2Cloud::batch`] drops the ids named in the error and retries the rest, so one
//! bad id never holds up the others.

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_ec2::{
    error::{ProvideErrorMetadata, SdkError},
    types::{
        BlockDeviceMapping as Ec2BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState,
        IamInstanceProfileSpecification, InstanceMetadataEndpointState,
        InstanceMetadataOptionsRequest, InstanceType, ResourceType, Tag, TagSpecification,
        VolumeType as Ec2VolumeType,
    },
};
use base64::Engine;
use tokio::time::Instant;

use super::{
    BatchOutcome, CloudError, CloudProvider, Instance, InstanceProfileRef, InstanceState,
    LaunchOutcome, LaunchRequest, LaunchSpec, NodeClassCheck, NodeClassRefs, batches,
    ratelimit::{Limits, Operation, RateLimiter},
    spread_across_subnets, tags,
};
use crate::{
    api::awsnodeclass::{HttpEndpoint, HttpTokens, ResolvedSubnet},
    metrics::CloudApiMetrics,
};

#[derive(Debug, thiserror::Error)]
pub enum Ec2ConfigError {
    #[error(
        "no AWS region configured: pass --region (or STRATOS_REGION), or set AWS_REGION for the SDK"
    )]
    NoRegion,
}

/// Loads the AWS configuration from the environment (IRSA / pod identity in a cluster,
/// static credentials or profiles elsewhere). No request is made: credentials resolve lazily.
pub async fn sdk_config_from_env(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> Result<SdkConfig, Ec2ConfigError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let sdk_config = loader.load().await;
    if sdk_config.region().is_none() {
        return Err(Ec2ConfigError::NoRegion);
    }
    Ok(sdk_config)
}

/// Retry policy for transient errors.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter": uniform in [0, min(max, base·2^attempt)], which spreads retries of
    /// many callers hitting the same shared bucket.
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(16));
        let ceiling = exp.min(self.max_delay);
        ceiling.mul_f64(fastrand::f64())
    }
}

pub struct Ec2Cloud {
    api: Arc<Api>,
    cluster: String,
    page_size: i32,
}

/// The client with its rate limiter, retry policy and metrics; shared with background tasks.
struct Api {
    client: aws_sdk_ec2::Client,
    limiter: RateLimiter,
    retry: RetryPolicy,
    metrics: Arc<CloudApiMetrics>,
}

impl Ec2Cloud {
    pub fn new(
        sdk_config: &SdkConfig,
        cluster: impl Into<String>,
        limits: Limits,
        retry: RetryPolicy,
        metrics: Arc<CloudApiMetrics>,
    ) -> Self {
        let config = aws_sdk_ec2::config::Builder::from(sdk_config)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            )
            .build();
        Self {
            api: Arc::new(Api {
                client: aws_sdk_ec2::Client::from_conf(config),
                limiter: RateLimiter::new(limits),
                retry,
                metrics,
            }),
            cluster: cluster.into(),
            page_size: 1000,
        }
    }

    /// DescribeInstances page size (EC2 accepts 5–1000). Large pages keep a listing to one
    /// or two calls; tests shrink it to exercise pagination.
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = page_size.clamp(5, 1000);
        self
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    fn client(&self) -> &aws_sdk_ec2::Client {
        &self.api.client
    }

    async fn call<T, E, F, Fut>(
        &self,
        op: Operation,
        resources: usize,
        send: F,
    ) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.api.call(op, resources, send).await
    }

    /// A Start/Stop/Terminate over many ids: EC2-sized batches, and within each, ids named
    /// in a whole-call error are set aside so the rest still go through.
    async fn batch<F, Fut, E>(&self, op: Operation, ids: &[String], send: F) -> BatchOutcome
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Result<(), SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut outcome = BatchOutcome::default();
        for chunk in batches(ids) {
            let mut remaining: Vec<String> = chunk.to_vec();
            while !remaining.is_empty() {
                let attempt = remaining.clone();
                match self.call(op, attempt.len(), || send(attempt.clone())).await {
                    Ok(()) => {
                        outcome.succeeded.append(&mut remaining);
                    }
                    Err(error) => {
                        let named = ids_named_in(&error, &remaining);
                        if named.is_empty() {
                            outcome.merge(BatchOutcome::all_failed(&remaining, &error));
                            remaining.clear();
                        } else {
                            remaining.retain(|id| !named.contains(id));
                            outcome
                                .failed
                                .extend(named.into_iter().map(|id| (id, error.clone())));
                        }
                    }
                }
            }
        }
        outcome
    }

    async fn run_instances(
        &self,
        spec: &LaunchSpec,
        subnet_id: &str,
        count: usize,
        instance_tags: &BTreeMap<String, String>,
        client_token: &str,
    ) -> Result<Vec<Instance>, CloudError> {
        let to_tags = |m: &BTreeMap<String, String>| -> Vec<Tag> {
            m.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect()
        };
        // Volumes carry the ownership tags but not the per-instance lifecycle mirror.
        let volume_tags: BTreeMap<String, String> = instance_tags
            .iter()
            .filter(|(k, _)| k.as_str() != tags::STATE && k.as_str() != tags::NODECLASS_HASH)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let profile = match spec.instance_profile() {
            InstanceProfileRef::Arn(arn) => IamInstanceProfileSpecification::builder().arn(arn),
            InstanceProfileRef::Name(name) => IamInstanceProfileSpecification::builder().name(name),
        }
        .build();
        let metadata = InstanceMetadataOptionsRequest::builder()
            .http_tokens(match spec.metadata_http_tokens {
                HttpTokens::Required => HttpTokensState::Required,
                HttpTokens::Optional => HttpTokensState::Optional,
            })
            .http_put_response_hop_limit(spec.metadata_hop_limit)
            .http_endpoint(match spec.metadata_http_endpoint {
                HttpEndpoint::Enabled => InstanceMetadataEndpointState::Enabled,
                HttpEndpoint::Disabled => InstanceMetadataEndpointState::Disabled,
            })
            .build();
        let mut request = self
            .client()
            .run_instances()
            .image_id(&spec.ami)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            // All or nothing per subnet: a zone short of capacity answers
            // InsufficientInstanceCapacity and `launch` moves the whole share elsewhere.
            .min_count(count as i32)
            .max_count(count as i32)
            .subnet_id(subnet_id)
            .set_security_group_ids(Some(spec.security_group_ids.clone()))
            .iam_instance_profile(profile)
            .metadata_options(metadata)
            .client_token(client_token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(to_tags(instance_tags)))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(to_tags(&volume_tags)))
                    .build(),
            );
        if let Some(user_data) = &spec.user_data {
            request =
                request.user_data(base64::engine::general_purpose::STANDARD.encode(user_data));
        }
        for bdm in &spec.block_device_mappings {
            let mut ebs = EbsBlockDevice::builder()
                .delete_on_termination(bdm.delete_on_termination)
                .set_volume_size(bdm.volume_size)
                .set_iops(bdm.iops)
                .set_throughput(bdm.throughput)
                .set_encrypted(bdm.encrypted)
                .set_kms_key_id(bdm.kms_key_id.clone());
            if let Some(vt) = bdm.volume_type {
                ebs = ebs.volume_type(Ec2VolumeType::from(vt.as_str()));
            }
            request = request.block_device_mappings(
                Ec2BlockDeviceMapping::builder()
                    .device_name(&bdm.device_name)
                    .ebs(ebs.build())
                    .build(),
            );
        }
        let output = self
            .call(Operation::RunInstances, count, || request.clone().send())
            .await?;
        Ok(output
            .instances()
            .iter()
            .filter_map(convert_instance)
            .collect())
    }

    /// `Name=<pool>-<short id>` needs the instance id, so it is set after launch, one
    /// CreateTags per instance. It is cosmetic, so it runs in the background (a launch
    /// returns as soon as EC2 answered) and a failure is only logged.
    fn name_instances(&self, instances: &[Instance], pool: &str) {
        let names: Vec<(String, String)> = instances
            .iter()
            .map(|inst| {
                let short = inst.id.trim_start_matches("i-");
                let short = &short[short.len().saturating_sub(8)..];
                (inst.id.clone(), format!("{pool}-{short}"))
            })
            .collect();
        if names.is_empty() {
            return;
        }
        let api = self.api.clone();
        tokio::spawn(async move {
            for (id, name) in names {
                let request = api
                    .client
                    .create_tags()
                    .resources(&id)
                    .tags(Tag::builder().key(tags::NAME).value(name).build());
                if let Err(e) = api
                    .call(Operation::CreateTags, 0, || request.clone().send())
                    .await
                {
                    tracing::warn!(instance = %id, error = %e, "could not set the Name tag");
                }
            }
        });
    }

    /// Ids of `filter_values` that exist, by a filtered Describe (which, unlike the id
    /// parameters, does not fail the whole call on the first missing id).
    fn id_filter(name: &str, values: &[String]) -> Filter {
        Filter::builder()
            .name(name)
            .set_values(Some(values.to_vec()))
            .build()
    }
}

impl Api {
    /// One API call with rate limiting, metrics, error mapping and retries. `send` must
    /// build the same request each time (same ClientToken), so a retry is idempotent.
    async fn call<T, E, F, Fut>(
        &self,
        op: Operation,
        resources: usize,
        send: F,
    ) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let waited = self.limiter.acquire(op, resources).await;
            self.metrics.observe_rate_limit_wait(op, waited);
            let start = Instant::now();
            let result = send().await;
            let elapsed = start.elapsed();
            let (error, retryable) = match result {
                Ok(value) => {
                    self.metrics.observe_call(op, "success", elapsed);
                    return Ok(value);
                }
                Err(err) => classify_sdk_error(&err),
            };
            self.metrics.observe_call(op, error.label(), elapsed);
            if !retryable || attempt >= self.retry.max_attempts {
                return Err(error);
            }
            let delay = self.retry.delay(attempt);
            tracing::debug!(operation = op.as_str(), attempt, error = %error, delay_ms = delay.as_millis() as u64, "retrying cloud call");
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl CloudProvider for Ec2Cloud {
    async fn launch(&self, request: &LaunchRequest) -> LaunchOutcome {
        let mut outcome = LaunchOutcome::default();
        let split = spread_across_subnets(
            &request.spec.subnet_ids,
            &request.existing_per_subnet,
            request.count,
        );
        let index_of = |subnet: &str| {
            request
                .spec
                .subnet_ids
                .iter()
                .position(|s| s == subnet)
                .unwrap_or(0)
        };
        let mut exhausted: HashSet<String> = HashSet::new();
        let mut pending: Vec<(String, usize, String)> = split
            .into_iter()
            .map(|(subnet, n)| {
                let token = client_token(&request.client_token, &[index_of(&subnet)]);
                (subnet, n, token)
            })
            .collect();
        while let Some((subnet, count, token)) = pending.pop() {
            match self
                .run_instances(&request.spec, &subnet, count, &request.tags, &token)
                .await
            {
                Ok(instances) => {
                    let missing = count.saturating_sub(instances.len());
                    outcome.instances.extend(instances);
                    if missing > 0 {
                        outcome
                            .errors
                            .push(CloudError::InsufficientCapacity(format!(
                                "{subnet}: launched {} of {count}",
                                count - missing
                            )));
                    }
                }
                Err(CloudError::InsufficientCapacity(msg)) => {
                    // Capacity is per zone: try the class's other subnets before giving up.
                    exhausted.insert(subnet.clone());
                    let fallback = request
                        .spec
                        .subnet_ids
                        .iter()
                        .find(|s| !exhausted.contains(*s));
                    match fallback {
                        Some(next) => {
                            tracing::info!(from = %subnet, to = %next, count, "insufficient capacity; trying another subnet");
                            let token = client_token(
                                &request.client_token,
                                &[index_of(next), index_of(&subnet)],
                            );
                            pending.push((next.clone(), count, token));
                        }
                        None => outcome.errors.push(CloudError::InsufficientCapacity(msg)),
                    }
                }
                Err(other) => outcome.errors.push(other),
            }
        }
        if let Some(pool) = request.tags.get(tags::POOL) {
            self.name_instances(&outcome.instances, pool);
        }
        outcome
    }

    async fn start_instances(&self, ids: &[String]) -> BatchOutcome {
        self.batch(Operation::StartInstances, ids, |ids| async move {
            self.client()
                .start_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map(|_| ())
        })
        .await
    }

    async fn stop_instances(&self, ids: &[String]) -> BatchOutcome {
        self.batch(Operation::StopInstances, ids, |ids| async move {
            self.client()
                .stop_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map(|_| ())
        })
        .await
    }

    async fn terminate_instances(&self, ids: &[String]) -> BatchOutcome {
        self.batch(Operation::TerminateInstances, ids, |ids| async move {
            self.client()
                .terminate_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map(|_| ())
        })
        .await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, CloudError> {
        let filter = Filter::builder()
            .name(format!("tag:{}", tags::CLUSTER))
            .values(&self.cluster)
            .build();
        let mut instances = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let request = self
                .client()
                .describe_instances()
                .filters(filter.clone())
                .max_results(self.page_size)
                .set_next_token(next_token.clone());
            let page = self
                .call(Operation::DescribeInstances, 0, || request.clone().send())
                .await?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().filter_map(convert_instance));
            }
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                break;
            }
        }
        // Defence in depth: the filter is the contract, but never hand back an instance
        // without our cluster tag (SPEC §4, invariant 2).
        instances.retain(|i| i.tag(tags::CLUSTER) == Some(self.cluster.as_str()));
        Ok(instances)
    }

    async fn set_tags(
        &self,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        let tag_list: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        for chunk in batches(ids) {
            let request = self
                .client()
                .create_tags()
                .set_resources(Some(chunk.to_vec()))
                .set_tags(Some(tag_list.clone()));
            self.call(Operation::CreateTags, 0, || request.clone().send())
                .await?;
        }
        Ok(())
    }

    async fn check_node_class(&self, refs: &NodeClassRefs) -> Result<NodeClassCheck, CloudError> {
        let mut check = NodeClassCheck::default();

        let images = self
            .client()
            .describe_images()
            .filters(Self::id_filter("image-id", std::slice::from_ref(&refs.ami)));
        let images = self
            .call(Operation::DescribeImages, 0, || images.clone().send())
            .await?;
        match images
            .images()
            .iter()
            .find(|i| i.image_id() == Some(refs.ami.as_str()))
        {
            None => check.problems.push(format!("AMI {} not found", refs.ami)),
            Some(image) => {
                if let Some(state) = image.state().filter(|s| s.as_str() != "available") {
                    check.problems.push(format!(
                        "AMI {} is {}, not available",
                        refs.ami,
                        state.as_str()
                    ));
                }
            }
        }

        let subnets = self
            .client()
            .describe_subnets()
            .filters(Self::id_filter("subnet-id", &refs.subnet_ids));
        let subnets = self
            .call(Operation::DescribeSubnets, 0, || subnets.clone().send())
            .await?;
        for id in &refs.subnet_ids {
            match subnets
                .subnets()
                .iter()
                .find(|s| s.subnet_id() == Some(id.as_str()))
            {
                Some(s) => check.subnets.push(ResolvedSubnet {
                    id: id.clone(),
                    zone: s.availability_zone().unwrap_or_default().to_owned(),
                    zone_id: s.availability_zone_id().map(str::to_owned),
                }),
                None => check.problems.push(format!("subnet {id} not found")),
            }
        }

        let groups = self
            .client()
            .describe_security_groups()
            .filters(Self::id_filter("group-id", &refs.security_group_ids));
        let groups = self
            .call(Operation::DescribeSecurityGroups, 0, || {
                groups.clone().send()
            })
            .await?;
        for id in &refs.security_group_ids {
            if !groups
                .security_groups()
                .iter()
                .any(|g| g.group_id() == Some(id.as_str()))
            {
                check
                    .problems
                    .push(format!("security group {id} not found"));
            }
        }
        Ok(check)
    }
}

/// A per-subnet ClientToken: the caller's token plus the subnet's position in the class
/// (and, for a capacity fallback, the subnet it replaces). EC2 allows 64 ASCII characters.
fn client_token(base: &str, parts: &[usize]) -> String {
    let suffix: String = parts.iter().map(|p| format!("-{p}")).collect();
    let keep = 64usize.saturating_sub(suffix.len());
    let base: String = base.chars().filter(char::is_ascii).take(keep).collect();
    format!("{base}{suffix}")
}

fn convert_instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = i.instance_id()?.to_owned();
    let state = InstanceState::parse(i.state()?.name()?.as_str())?;
    Some(Instance {
        id,
        state,
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        subnet_id: i.subnet_id().unwrap_or_default().to_owned(),
        private_dns_name: i
            .private_dns_name()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        private_ip: i.private_ip_address().map(str::to_owned),
        launch_time: i.launch_time().and_then(|t| SystemTime::try_from(*t).ok()),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
    })
}

fn classify_sdk_error<E>(
    err: &SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> (CloudError, bool)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let status = service.raw().status().as_u16();
            let (error, retryable) = map_error_code(
                e.code().unwrap_or("Unknown"),
                e.message().unwrap_or_default(),
            );
            // A 5xx makes an untyped error worth retrying; EC2 also sends capacity errors
            // as 5xx, and those must surface at once so the caller can try elsewhere.
            let transient = status >= 500 && matches!(error, CloudError::Other(_));
            (error, retryable || transient)
        }
        SdkError::TimeoutError(_) => (CloudError::Other("request timed out".into()), true),
        SdkError::DispatchFailure(d) => (
            CloudError::Other(format!("could not send the request: {d:?}")),
            true,
        ),
        SdkError::ResponseError(_) => (
            CloudError::Other("malformed response from EC2".into()),
            true,
        ),
        other => (CloudError::Other(other.to_string()), false),
    }
}

/// EC2 error code → typed error, and whether a retry may succeed.
pub fn map_error_code(code: &str, message: &str) -> (CloudError, bool) {
    let text = if message.is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {message}")
    };
    match code {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "TooManyRequestsException" => (CloudError::Throttled(text), true),
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded" => (CloudError::InsufficientCapacity(text), false),
        "IncorrectInstanceState" | "IncorrectState" | "IncorrectSpotRequestState" => {
            (CloudError::InvalidState(text), false)
        }
        "UnauthorizedOperation"
        | "AuthFailure"
        | "OptInRequired"
        | "Blocked"
        | "AccessDenied"
        | "AccessDeniedException" => (CloudError::Unauthorized(text), false),
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            (CloudError::Other(text), true)
        }
        c if c.ends_with(".NotFound") || c.ends_with(".Malformed") => {
            (CloudError::NotFound(text), false)
        }
        _ => (CloudError::Other(text), false),
    }
}

/// Instance ids of `batch` that an error message names (EC2 lists the offending ids in the
/// message of InvalidInstanceID.* and IncorrectInstanceState errors).
fn ids_named_in(error: &CloudError, batch: &[String]) -> Vec<String> {
    if !matches!(error, CloudError::NotFound(_) | CloudError::InvalidState(_)) {
        return Vec::new();
    }
    let text = error.to_string();
    let mentioned: HashSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("i-"))
        .collect();
    batch
        .iter()
        .filter(|id| mentioned.contains(id.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_typed_errors() {
        let cases = [
            ("RequestLimitExceeded", "throttled", true),
            ("Throttling", "throttled", true),
            (
                "InsufficientInstanceCapacity",
                "insufficient_capacity",
                false,
            ),
            ("InstanceLimitExceeded", "insufficient_capacity", false),
            ("VcpuLimitExceeded", "insufficient_capacity", false),
            ("IncorrectInstanceState", "invalid_state", false),
            ("InvalidInstanceID.NotFound", "not_found", false),
            ("InvalidInstanceID.Malformed", "not_found", false),
            ("InvalidAMIID.NotFound", "not_found", false),
            ("UnauthorizedOperation", "unauthorized", false),
            ("AuthFailure", "unauthorized", false),
            ("InternalError", "error", true),
            ("InvalidParameterValue", "error", false),
        ];
        for (code, label, retryable) in cases {
            let (err, retry) = map_error_code(code, "details");
            assert_eq!(err.label(), label, "{code}");
            assert_eq!(retry, retryable, "{code}");
            assert!(
                err.to_string().contains(code),
                "{code}: the message keeps the code"
            );
        }
    }

    #[test]
    fn offending_ids_are_read_from_the_error_message() {
        let batch: Vec<String> = ["i-0aaa", "i-0bbb", "i-0ccc"].map(String::from).to_vec();
        let cases = [
            (
                map_error_code(
                    "InvalidInstanceID.NotFound",
                    "The instance ID 'i-0bbb' does not exist",
                )
                .0,
                vec!["i-0bbb"],
            ),
            (
                map_error_code(
                    "InvalidInstanceID.NotFound",
                    "The instance IDs 'i-0aaa, i-0ccc' do not exist",
                )
                .0,
                vec!["i-0aaa", "i-0ccc"],
            ),
            (
                map_error_code(
                    "IncorrectInstanceState",
                    "The instance 'i-0ccc' is not in a state from which it can be started.",
                )
                .0,
                vec!["i-0ccc"],
            ),
            (
                map_error_code("InvalidInstanceID.Malformed", "Invalid id: \"i-0zzz\"").0,
                vec![],
            ),
            (
                map_error_code("RequestLimitExceeded", "Request limit exceeded for i-0aaa").0,
                vec![],
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(ids_named_in(&error, &batch), expected, "{error}");
        }
    }

    #[test]
    fn client_tokens_are_bounded_and_distinct_per_subnet() {
        let base = "x".repeat(100);
        let a = client_token(&base, &[0]);
        let b = client_token(&base, &[1]);
        let c = client_token(&base, &[1, 0]);
        for t in [&a, &b, &c] {
            assert!(t.len() <= 64, "{t}");
        }
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(client_token("pool-abc", &[2]), "pool-abc-2");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let policy = RetryPolicy::default();
        for attempt in 1..20 {
            let d = policy.delay(attempt);
            assert!(d <= policy.max_delay, "attempt {attempt}: {d:?}");
            let ceiling = policy
                .base_delay
                .saturating_mul(1 << attempt.min(16))
                .min(policy.max_delay);
            assert!(d <= ceiling);
        }
    }
}
