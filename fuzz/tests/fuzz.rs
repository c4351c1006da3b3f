//! A short, bounded pass of every fuzz target, in the test suite. The long
//! campaign is `cargo run --release -p wasmq-fuzz -- run` (docs/fuzzing.md).
//! Each run has a fixed seed, so a failure here replays exactly.

use std::time::{Duration, Instant};

use wasmq_fuzz::{Runner, Target};

/// Run cases of `target` until `cases` or `budget`, whichever comes first;
/// fail on the first case the broker mishandles.
fn pass(target: Target, seed: u64, cases: u64, budget: Duration) -> u64 {
    let runner = Runner::new(target).unwrap();
    let started = Instant::now();
    let mut done = 0;
    while done < cases && started.elapsed() < budget {
        if let Err(f) = runner.case(seed, done) {
            panic!("{f}");
        }
        done += 1;
    }
    println!(
        "{target}: {done} inputs in {:?}; connections closed with {}",
        started.elapsed(),
        runner.outcomes()
    );
    done
}

#[test]
fn frame_decoder() {
    assert!(pass(Target::Frames, 1, 5_000, Duration::from_secs(60)) >= 1_000);
}

#[test]
fn field_tables_properties_and_methods() {
    assert!(pass(Target::Codecs, 2, 20_000, Duration::from_secs(60)) >= 1_000);
}

#[test]
fn cluster_traffic() {
    assert!(pass(Target::Traffic, 5, 20_000, Duration::from_secs(60)) >= 1_000);
}

#[test]
fn connections_before_login() {
    assert!(pass(Target::Handshake, 3, 3_000, Duration::from_secs(90)) >= 300);
}

#[test]
fn connections_after_login() {
    let before = wasmq_fuzz::targets::resident_bytes();
    assert!(pass(Target::Connection, 4, 3_000, Duration::from_secs(120)) >= 300);
    if let (Some(b), Some(a)) = (before, wasmq_fuzz::targets::resident_bytes()) {
        // The cases' queues are deleted every 100 cases: what remains is
        // the broker's own, not what the inputs piled up.
        assert!(
            a < b + (1 << 30),
            "resident memory grew from {b} to {a} bytes"
        );
    }
}

#[test]
fn cluster_port_before_authentication() {
    assert!(pass(Target::ClusterHello, 6, 5_000, Duration::from_secs(60)) >= 500);
}

#[test]
fn admin_port_before_login() {
    assert!(pass(Target::Admin, 7, 5_000, Duration::from_secs(60)) >= 500);
}

#[test]
fn resp_request_parser() {
    assert!(pass(Target::RespParser, 8, 20_000, Duration::from_secs(60)) >= 1_000);
}

#[test]
fn redis_front_end() {
    assert!(pass(Target::Resp, 9, 3_000, Duration::from_secs(90)) >= 300);
}
