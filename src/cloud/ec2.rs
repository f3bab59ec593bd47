//! EC2 client construction from the environment (IRSA / pod identity in a cluster, static
//! credentials or profiles elsewhere), with an endpoint override for emulators.

use aws_config::{BehaviorVersion, Region};

#[derive(Debug, thiserror::Error)]
pub enum Ec2ConfigError {
    #[error(
        "no AWS region configured: pass --region (or STRATOS_REGION), or set AWS_REGION for the SDK"
    )]
    NoRegion,
}

/// Builds an EC2 client. No request is made: credentials resolve lazily on first call.
pub async fn client_from_env(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> Result<aws_sdk_ec2::Client, Ec2ConfigError> {
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
    Ok(aws_sdk_ec2::Client::new(&sdk_config))
}
