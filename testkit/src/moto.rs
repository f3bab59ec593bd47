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
