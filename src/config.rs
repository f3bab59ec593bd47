//! Command line and environment configuration (SPEC §8).
//!
//! Every flag has an environment equivalent (`STRATOS_*`). Values are validated while
//! parsing, so a bad configuration fails before anything connects anywhere, with a single
//! line naming the flag and the reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::{Args, Parser, Subcommand, ValueEnum, error::ErrorKind};

/// Version and git revision, as `stratos version` prints them.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_REVISION: &str = env!("STRATOS_GIT_REVISION");

#[derive(Debug, Parser)]
#[command(
    name = "stratos",
    about = "Kubernetes operator keeping pools of pre-warmed, reusable nodes",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (the container's command).
    Run(Box<RunConfig>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Print the version and git revision.
    Version,
    /// Exit 0 at once: the command of the image pre-pull containers.
    #[command(hide = true)]
    Noop,
    /// Copy this binary to DEST, for pre-pull containers of images without a shell.
    #[command(hide = true)]
    InstallNoop { dest: std::path::PathBuf },
}

#[derive(Debug, Clone, Args, PartialEq)]
pub struct RunConfig {
    /// Name of the cluster; every instance Stratos owns carries it in the `stratos.sh/cluster` tag.
    #[arg(long, env = "STRATOS_CLUSTER_NAME", value_parser = parse_cluster_name)]
    pub cluster_name: String,

    /// AWS region (default: the AWS SDK's resolution, e.g. AWS_REGION).
    #[arg(long, env = "STRATOS_REGION", value_parser = parse_region)]
    pub region: Option<String>,

    /// Override the EC2 endpoint, e.g. for an emulator.
    #[arg(long, env = "STRATOS_AWS_ENDPOINT_URL", value_parser = parse_endpoint_url)]
    pub aws_endpoint_url: Option<String>,

    /// Address serving /metrics (`:8080` means every interface).
    #[arg(long, env = "STRATOS_METRICS_ADDR", default_value = ":8080", value_parser = parse_listen_addr)]
    pub metrics_addr: SocketAddr,

    /// Address serving /healthz and /readyz.
    #[arg(long, env = "STRATOS_HEALTH_ADDR", default_value = ":8081", value_parser = parse_listen_addr)]
    pub health_addr: SocketAddr,

    /// Elect a leader through a coordination/v1 Lease; only the leader acts.
    #[arg(
        long,
        env = "STRATOS_LEADER_ELECT",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub leader_elect: bool,

    /// Name of the leader Lease.
    #[arg(
        long,
        env = "STRATOS_LEADER_ELECT_LEASE_NAME",
        default_value = "stratos-leader"
    )]
    pub leader_elect_lease_name: String,

    /// Namespace of the leader Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "STRATOS_LEADER_ELECT_NAMESPACE")]
    pub leader_elect_namespace: Option<String>,

    /// How long the lease outlives the leader's last renewal: a standby replica takes over
    /// within this long of the leader's death (3s to 5m).
    #[arg(long, env = "STRATOS_LEADER_ELECT_LEASE_DURATION", default_value = "12s", value_parser = parse_lease_duration)]
    pub leader_elect_lease_duration: std::time::Duration,

    /// Log line format.
    #[arg(long, env = "STRATOS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Namespace of the image pre-pull pods (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub prepull_namespace: String,

    /// Image whose `/stratos` binary runs in the pre-pull pods (default: this version's image).
    #[arg(long, env = "STRATOS_PREPULL_IMAGE")]
    pub prepull_image: Option<String>,

    /// Manage only the NodePools and AWSNodeClasses matching this label selector (and the
    /// Nodes of those pools), e.g. `team=ci`: several operators can share one cluster.
    /// Default: every pool.
    #[arg(long, env = "STRATOS_POOL_SELECTOR")]
    pub pool_selector: Option<String>,

    /// Multiplies the client-side EC2 rate limits (EC2's default account buckets), for an
    /// account whose API throttling limits AWS has raised; below 1 leaves room for other
    /// clients of the same account (0.1 to 100).
    #[arg(long, env = "STRATOS_EC2_RATE_LIMIT_SCALE", default_value_t = 1.0, value_parser = parse_rate_limit_scale)]
    pub ec2_rate_limit_scale: f64,
}

fn parse_rate_limit_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.1..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0.1 to 100"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

impl RunConfig {
    /// Checks that involve more than one flag.
    fn validate(&self) -> Result<(), String> {
        // Port 0 asks the OS for a free port, so two of them never clash.
        if self.metrics_addr == self.health_addr && self.metrics_addr.port() != 0 {
            return Err(format!(
                "--metrics-addr and --health-addr must differ (both are {})",
                self.metrics_addr
            ));
        }
        Ok(())
    }
}

/// A configuration error, already rendered as the one line to print.
#[derive(Debug)]
pub struct ConfigError {
    pub message: String,
    /// Help and version requests are not errors: they print and exit 0.
    pub is_request: bool,
}

impl Cli {
    /// Parses and validates the command line; errors come back as one line.
    pub fn parse_from_args<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|err| {
            let is_request = matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            let message = if is_request {
                err.to_string()
            } else {
                one_line(&err.render().to_string())
            };
            ConfigError {
                message,
                is_request,
            }
        })?;
        if let Command::Run(run) = &cli.command {
            run.validate().map_err(|reason| ConfigError {
                message: format!("error: {reason}"),
                is_request: false,
            })?;
        }
        Ok(cli)
    }
}

/// clap renders errors over several lines (with usage and a help hint); operators reading a
/// crash-looping pod's last log line need the reason on one.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cluster names become tag values and IAM condition values; EKS allows 1–100 characters
/// of letters, digits, `-` and `_`, starting with a letter or digit.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 100 {
        return Err(format!("must be at most 100 characters (got {})", s.len()));
    }
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(
            "must start with a letter or digit and contain only letters, digits, '-' and '_'"
                .into(),
        );
    }
    Ok(s.to_owned())
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `ap-southeast-5`…
fn parse_region(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('-').collect();
    let well_formed = parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty();
    if well_formed {
        Ok(s.to_owned())
    } else {
        Err("must look like an AWS region, e.g. us-east-1".into())
    }
}

fn parse_endpoint_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("must be an http:// or https:// URL")?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn parse_lease_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = s
        .parse::<crate::api::Duration>()
        .map_err(|e| e.to_string())?
        .as_std();
    if !(3..=300).contains(&d.as_secs()) {
        return Err(format!("lease duration {s:?} must be between 3s and 5m"));
    }
    Ok(d)
}

/// Accepts the Go form (`:8080`, every interface) as well as `host:port`.
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid port in {s:?}: expected :PORT or HOST:PORT"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    // "localhost:8080" and similar: resolve without touching the network.
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid port in {s:?}: expected :PORT or HOST:PORT"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(format!(
        "invalid address {s:?}: expected :PORT or IP:PORT, e.g. :8080 or 127.0.0.1:8080"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut argv = vec!["stratos", "run"];
        argv.extend_from_slice(args);
        match Cli::parse_from_args(argv)?.command {
            Command::Run(cfg) => Ok(*cfg),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let cfg = run(&["--cluster-name", "prod-1"]).unwrap();
        assert_eq!(cfg.cluster_name, "prod-1");
        assert_eq!(cfg.metrics_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(cfg.health_addr, "0.0.0.0:8081".parse().unwrap());
        assert!(cfg.leader_elect);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.region, None);
        assert_eq!(cfg.aws_endpoint_url, None);
        assert_eq!(cfg.leader_elect_lease_name, "stratos-leader");
        assert_eq!(cfg.leader_elect_namespace, None);
        assert_eq!(cfg.leader_elect_lease_duration.as_secs(), 12);
        assert_eq!(cfg.ec2_rate_limit_scale, 1.0);
    }

    #[test]
    fn the_rate_limit_scale_is_bounded() {
        let cfg = run(&["--cluster-name=c", "--ec2-rate-limit-scale=20"]).unwrap();
        assert_eq!(cfg.ec2_rate_limit_scale, 20.0);
        for bad in ["0", "0.05", "101", "fast"] {
            assert!(
                run(&["--cluster-name=c", &format!("--ec2-rate-limit-scale={bad}")]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn accepts_every_flag() {
        let cfg = run(&[
            "--cluster-name=c",
            "--region=eu-west-1",
            "--aws-endpoint-url=http://127.0.0.1:5000/",
            "--metrics-addr=127.0.0.1:9090",
            "--health-addr=:9091",
            "--leader-elect=false",
            "--log-format=text",
            "--leader-elect-lease-name=l",
            "--leader-elect-namespace=ops",
            "--leader-elect-lease-duration=1m",
            "--pool-selector=team=ci",
        ])
        .unwrap();
        assert_eq!(cfg.pool_selector.as_deref(), Some("team=ci"));
        assert_eq!(cfg.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            cfg.aws_endpoint_url.as_deref(),
            Some("http://127.0.0.1:5000")
        );
        assert_eq!(cfg.metrics_addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(cfg.health_addr, "0.0.0.0:9091".parse().unwrap());
        assert!(!cfg.leader_elect);
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.leader_elect_lease_name, "l");
        assert_eq!(cfg.leader_elect_namespace.as_deref(), Some("ops"));
        assert_eq!(cfg.leader_elect_lease_duration.as_secs(), 60);
        // A bare flag means true.
        assert!(
            run(&["--cluster-name=c", "--leader-elect"])
                .unwrap()
                .leader_elect
        );
    }

    #[test]
    fn bad_values_give_one_line_naming_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--cluster-name", ""], "--cluster-name"),
            (&["--cluster-name=-bad"], "--cluster-name"),
            (&["--cluster-name", "has space"], "--cluster-name"),
            (&[], "--cluster-name"),
            (&["--cluster-name=c", "--region=Mars"], "--region"),
            (
                &["--cluster-name=c", "--aws-endpoint-url=ftp://x"],
                "--aws-endpoint-url",
            ),
            (
                &["--cluster-name=c", "--metrics-addr=8080"],
                "--metrics-addr",
            ),
            (
                &["--cluster-name=c", "--health-addr=:99999"],
                "--health-addr",
            ),
            (
                &["--cluster-name=c", "--leader-elect=maybe"],
                "--leader-elect",
            ),
            (&["--cluster-name=c", "--log-format=xml"], "--log-format"),
            (
                &["--cluster-name=c", "--leader-elect-lease-duration=1s"],
                "--leader-elect-lease-duration",
            ),
            (
                &["--cluster-name=c", "--leader-elect-lease-duration=soon"],
                "--leader-elect-lease-duration",
            ),
            (
                &[
                    "--cluster-name=c",
                    "--metrics-addr=:80",
                    "--health-addr=:80",
                ],
                "--health-addr",
            ),
            (&["--cluster-name=c", "--no-such-flag"], "--no-such-flag"),
        ];
        for (args, flag) in cases {
            let err = run(args).expect_err(&format!("{args:?} must be rejected"));
            assert!(!err.is_request);
            assert!(
                !err.message.contains('\n'),
                "{args:?}: not one line: {:?}",
                err.message
            );
            assert!(
                err.message.starts_with("error:"),
                "{args:?}: {}",
                err.message
            );
            assert!(
                err.message.contains(flag),
                "{args:?}: {} lacks {flag}",
                err.message
            );
        }
    }

    #[test]
    fn help_is_a_request_not_an_error() {
        let err = Cli::parse_from_args(["stratos", "--help"]).unwrap_err();
        assert!(err.is_request);
    }
}
