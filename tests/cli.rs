//! The `stratos` binary as a user meets it: bad configuration exits non-zero with one line,
//! `version` prints the revision, and `run` explains what is missing before it does anything.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
};

fn stratos(args: &[&str], kubeconfig: Option<&Path>, home: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stratos"));
    cmd.args(args)
        // Keep the process off the network and away from the developer's own configuration.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        // Tests run in parallel: let the OS pick the endpoints' ports.
        .env("STRATOS_METRICS_ADDR", "127.0.0.1:0")
        .env("STRATOS_HEALTH_ADDR", "127.0.0.1:0");
    if let Some(path) = kubeconfig {
        cmd.env("KUBECONFIG", path);
    }
    cmd.output().unwrap()
}

fn temp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stratos-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bad_configuration_exits_non_zero_with_one_line() {
    let home = temp_home("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--cluster-name", ""], "--cluster-name"),
        (&["run"], "--cluster-name"),
        (
            &["run", "--cluster-name=c", "--log-format=xml"],
            "--log-format",
        ),
        (
            &["run", "--cluster-name=c", "--metrics-addr=nope"],
            "--metrics-addr",
        ),
        (
            &["run", "--cluster-name=c", "--leader-elect=perhaps"],
            "--leader-elect",
        ),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, flag) in cases {
        let out = stratos(args, None, &home);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {lines:?}");
        assert!(lines[0].contains(flag), "{args:?}: {lines:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn environment_variables_are_validated_like_flags() {
    let home = temp_home("env");
    let out = Command::new(env!("CARGO_BIN_EXE_stratos"))
        .args(["run"])
        .env_clear()
        .env("HOME", &home)
        .env("STRATOS_CLUSTER_NAME", "ok")
        .env("STRATOS_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("--log-format"), "{lines:?}");
}

#[test]
fn version_prints_version_and_revision() {
    let out = stratos(&["version"], None, &temp_home("version"));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("stratos {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(!text.contains("()"), "revision missing: {text}");
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {server}\n\
             users:\n- name: t\n  user:\n    token: t\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n\
             current-context: t\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn run_fails_clearly_when_the_api_server_is_unreachable() {
    let home = temp_home("unreachable");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = kubeconfig(&home, &format!("http://127.0.0.1:{port}"));
    let out = stratos(
        &[
            "run",
            "--cluster-name=c",
            "--region=us-east-1",
            "--log-format=text",
        ],
        Some(&config),
        &home,
    );
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("cannot reach the Kubernetes API server"),
        "{lines:?}"
    );
    assert!(lines[0].contains(&port.to_string()), "{lines:?}");
}

/// An API server without our CRDs: `/version` answers, every other path is a 404 `Status`,
/// which is what kube-apiserver returns for a resource it does not serve.
fn api_server_without_crds() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = if path == "/version" {
                (
                    "200 OK",
                    r#"{"major":"1","minor":"33","gitVersion":"v1.33.0","gitCommit":"x","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.24","compiler":"gc","platform":"linux/amd64"}"#,
                )
            } else {
                (
                    "404 Not Found",
                    r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#,
                )
            };
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn run_fails_clearly_when_the_crds_are_not_installed() {
    let home = temp_home("nocrds");
    let port = api_server_without_crds();
    let config = kubeconfig(&home, &format!("http://127.0.0.1:{port}"));
    let out = stratos(
        &[
            "run",
            "--cluster-name=c",
            "--region=us-east-1",
            "--log-format=text",
        ],
        Some(&config),
        &home,
    );
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("awsnodeclasses.stratos.sh) is not installed"),
        "{lines:?}"
    );
    assert!(
        lines[0].contains("kubectl apply"),
        "the error says how to fix it: {lines:?}"
    );
}

#[test]
fn run_fails_clearly_without_an_aws_region() {
    let home = temp_home("noregion");
    let config = kubeconfig(&home, "http://127.0.0.1:1");
    let out = stratos(
        &["run", "--cluster-name=c", "--log-format=text"],
        Some(&config),
        &home,
    );
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("no AWS region"), "{lines:?}");
}
