//! The built `wasmq` binary as a child process, for the tests that need a
//! real process (kill -9, SIGTERM, the CLI).

pub mod checker;
pub mod cluster;
pub mod on_time;

use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The path of the built binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_wasmq");

/// `wasmq serve` on a data and a plugin folder, both listeners on port 0.
pub struct Broker {
    pub child: Child,
    /// `host:port` of the AMQP and admin listeners, once [`Broker::ready`].
    listening: Option<(String, String)>,
    /// `host:port` the node-to-node listener is bound to, for a cluster
    /// node (others dial its advertised address, which may be a proxy).
    pub cluster_addr: Option<String>,
}

impl Broker {
    /// `wasmq serve` on a data and a plugin folder, both listeners on port 0.
    #[allow(dead_code)]
    pub fn spawn(data: &Path, plugins: &Path) -> Broker {
        Self::serve(|c| {
            c.arg("--data-dir")
                .arg(data)
                .arg("--plugin-dir")
                .arg(plugins);
        })
    }

    /// `wasmq serve --config FILE`, both listeners on port 0.
    #[allow(dead_code)]
    pub fn spawn_config(config: &Path) -> Broker {
        Self::serve(|c| {
            c.arg("--config").arg(config);
        })
    }

    fn serve(args: impl FnOnce(&mut Command)) -> Broker {
        let mut command = Command::new(BIN);
        command
            .args(["--log-json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"]);
        args(&mut command);
        let child = command
            // WASMQ_TEST_RUST_LOG sets the broker's filter, to debug a test.
            .env(
                "RUST_LOG",
                std::env::var("WASMQ_TEST_RUST_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".to_owned()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start wasmq");
        Broker {
            child,
            listening: None,
            cluster_addr: None,
        }
    }

    /// Wait for both "listening" log lines; returns (AMQP, admin) addresses.
    /// The output keeps being drained afterwards so the child never blocks
    /// on a full pipe.
    pub async fn ready(&mut self) -> (String, String) {
        if let Some(l) = &self.listening {
            return l.clone();
        }
        let stdout = self.child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut amqp, mut admin) = (None, None);
        // WASMQ_TEST_LOG=1 echoes the broker's log, to debug a test.
        // Each line is prefixed with the node's name once it is known.
        let echo = std::env::var_os("WASMQ_TEST_LOG").is_some();
        let mut label = String::new();
        while let Some(line) = lines.next_line().await.expect("read log") {
            if echo {
                eprintln!("{label}{line}");
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(a) = v["fields"]["amqp_addr"].as_str() {
                amqp = Some(a.to_owned());
            }
            if v["fields"]["message"] == "admin API listening" {
                admin = v["fields"]["addr"].as_str().map(str::to_owned);
            }
            if v["fields"]["message"] == "cluster node started" {
                self.cluster_addr = v["fields"]["listen"].as_str().map(str::to_owned);
                if let Some(n) = v["fields"]["node"].as_str() {
                    label = format!("[{n}] ");
                }
            }
            if let (Some(amqp), Some(admin)) = (&amqp, &admin) {
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        if echo {
                            eprintln!("{label}{line}");
                        }
                    }
                });
                let l = (amqp.clone(), admin.clone());
                self.listening = Some(l.clone());
                return l;
            }
        }
        panic!("wasmq exited before listening");
    }

    /// SIGKILL, and reap it.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("kill -9");
        self.child.wait().await.expect("reap");
    }

    /// SIGTERM (a graceful stop), and wait for the process to exit.
    #[allow(dead_code)]
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("pid");
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {pid}");
        self.child.wait().await.expect("reap");
    }
}
