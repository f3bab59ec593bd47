//! Starts `moto_server` (PyPI `moto`, the EC2 API emulator) on a free 127.0.0.1 port.
//!
//! The binary is found through `STRATOS_MOTO_SERVER`, then the virtualenv `.ci/run` creates
//! (`$HOME/.cache/stratos/venv`), then `PATH`. Without it, tests skip locally but fail under
//! CI (`CI=true`), so a missing install step can never pass as green.

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// A fresh, empty emulator; `None` (with a note on stderr) when moto is not installed
    /// and this is not CI.
    pub fn start() -> Option<Moto> {
        let Some(binary) = find_binary() else {
            let msg = "moto_server not found: run `.ci/run` once, or `python3 -m venv ~/.cache/stratos/venv && ~/.cache/stratos/venv/bin/pip install 'moto[server]==5.2.5'`";
            if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
                panic!("{msg}");
            }
            eprintln!("skipping: {msg}");
            return None;
        };
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ALLOW_NONEXISTENT_REGION", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 60s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(moto)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates an IAM instance profile (moto checks that launches name an existing one).
    pub fn create_instance_profile(&self, name: &str) {
        let body =
            format!("Action=CreateInstanceProfile&InstanceProfileName={name}&Version=2010-05-08");
        let (status, text) = crate::http::post_form(self.port, "iam", &body);
        assert!(
            status == 200,
            "CreateInstanceProfile failed: {status} {text}"
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STRATOS_MOTO_SERVER") {
        return Some(PathBuf::from(path));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = PathBuf::from(home).join(".cache/stratos/venv/bin/moto_server");
        if venv.is_file() {
            return Some(venv);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("moto_server"))
            .find(|p| p.is_file())
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A network to launch into: one VPC, a /20 subnet (4,091 addresses) in each of three zones, a security group,
/// moto's first Amazon AMI and the instance profile `node-role`.
pub struct Ec2Account {
    pub client: aws_sdk_ec2::Client,
    /// `(subnet id, zone)`, zones a, b and c of us-east-1.
    pub subnets: Vec<(String, String)>,
    pub security_group: String,
    pub ami: String,
}

impl Ec2Account {
    /// Replaces the placeholder ids of the examples (`subnet-12345678`, `sg-12345678`,
    /// `ami-0123456789abcdef0`) with ones that exist in this account.
    pub fn localize(&self, yaml: &str) -> String {
        yaml.replace("subnet-12345678", &self.subnets[0].0)
            .replace("sg-12345678", &self.security_group)
            .replace("ami-0123456789abcdef0", &self.ami)
    }
}

/// An SDK configuration for an EC2 endpoint on 127.0.0.1 (this emulator, or a fault proxy
/// in front of it): us-east-1, static test credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "test", "test", None, None, "testkit",
        ))
        .load()
        .await
}

impl Moto {
    /// An EC2 client for this emulator, with static test credentials in us-east-1.
    pub fn ec2_client(&self) -> aws_sdk_ec2::Client {
        use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new("test", "test", None, None, "testkit"))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// Creates the network an AWSNodeClass needs (see [`Ec2Account`]).
    pub async fn account(&self) -> Ec2Account {
        self.create_instance_profile("node-role");
        let client = self.ec2_client();
        let vpc = client
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .expect("CreateVpc");
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("vpc id")
            .to_owned();
        let mut subnets = Vec::new();
        for (i, zone) in ["us-east-1a", "us-east-1b", "us-east-1c"]
            .iter()
            .enumerate()
        {
            let s = client
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(format!("10.0.{}.0/20", i * 16))
                .availability_zone(*zone)
                .send()
                .await
                .expect("CreateSubnet");
            let id = s.subnet().and_then(|s| s.subnet_id()).expect("subnet id");
            subnets.push((id.to_owned(), zone.to_string()));
        }
        let sg = client
            .create_security_group()
            .group_name("nodes")
            .description("nodes")
            .vpc_id(&vpc_id)
            .send()
            .await
            .expect("CreateSecurityGroup");
        let images = client
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .expect("DescribeImages");
        Ec2Account {
            security_group: sg.group_id().expect("group id").to_owned(),
            ami: images.images()[0].image_id().expect("image id").to_owned(),
            subnets,
            client,
        }
    }
}
