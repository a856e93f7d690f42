//! `kiln train` across processes: `--nproc 2` and two "nodes" on 127.0.0.1 reach the weights of
//! ranks on threads; the torchrun environment variables drive a rank; a killed rank stops the
//! others with an error naming it; a port in use, an unreachable master and mismatched configs are
//! clear errors before training.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use kiln::distributed::{Communicator, Transport, trainer_builder};
use kiln::trainer::TrainConfig;

type B = Autodiff<Flex>;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln failed: {err}");
    err
}

/// A port with `count` free ports after it (best effort: bound and released).
fn free_port(count: u16) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 60000 && (1..count).all(|i| std::net::TcpListener::bind(("0.0.0.0", p + i)).is_ok())
        {
            return p;
        }
    }
}

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/tiny.toml")
}

/// `kiln train` on the tiny config with the shards `data` into `out`: `steps` steps at ZeRO `stage`.
fn args<'a>(data: &'a str, out: &'a str, stage: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--config",
        config_path().to_str().unwrap().to_owned().leak(),
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        steps,
        "--zero-stage",
        stage,
    ]
}

/// The tensors of a model directory's safetensors file, as f32.
fn weights(model_dir: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

fn assert_same_weights(a: &Path, b: &Path) {
    assert_same_weights_within(a, b, 1e-5);
}

fn assert_same_weights_within(a: &Path, b: &Path, tolerance: f32) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tolerance, "{name}: differs by {worst}");
    }
}

/// Two ranks on threads of this process, through the library, at ZeRO `stage`.
fn thread_run(data: &Path, out: &Path, stage: u8) {
    let mut config = TrainConfig::load(config_path()).unwrap();
    config.data_dir = data.to_owned();
    config.max_steps = 8;
    config.zero_stage = stage;
    std::thread::scope(|s| {
        for rank in 0..2 {
            let config = config.clone();
            s.spawn(move || {
                let comm =
                    Communicator::join(rank, 2, Default::default(), &Transport::Threads).unwrap();
                let mut t = trainer_builder::<B>(Arc::new(comm), stage, Default::default())
                    .start(config, out)
                    .unwrap();
                t.train().unwrap();
            });
        }
    });
}

#[test]
fn processes_and_nodes_reach_the_weights_of_threads() {
    let (dir, data, _) = common::tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let data_s = p(&data);
    let threads = dir.path().join("threads");
    thread_run(&data, &threads, 2);
    let final_model = |run: &Path| run.join("checkpoints/step-8/model");

    // --nproc 2 on this machine.
    let procs = p(&dir.path().join("procs"));
    let port = free_port(5).to_string();
    let master = format!("127.0.0.1:{port}");
    let mut a = args(&data_s, &procs, "2", "8");
    a.extend(["--nproc", "2", "--master", &master]);
    let err = ok(kiln().args(&a).output().unwrap());
    assert!(
        err.contains("data parallel: 2 ranks, ZeRO stage 2"),
        "{err}"
    );
    assert_same_weights(&final_model(&threads), &final_model(Path::new(&procs)));
    // Each rank wrote its shard of the optimizer state.
    assert!(
        Path::new(&procs)
            .join("checkpoints/step-8/zero-rank-00001-of-00002.safetensors")
            .exists()
    );

    // Two "nodes" on 127.0.0.1, one process each, through the orchestrator, at ZeRO-3 (each
    // block's weights gathered across the processes inside the forward and backward passes).
    let threads3 = dir.path().join("threads-zero3");
    thread_run(&data, &threads3, 3);
    let nodes = p(&dir.path().join("nodes"));
    let port = free_port(5).to_string();
    let master = format!("127.0.0.1:{port}");
    let spawn = |node: &str| {
        let mut a = args(&data_s, &nodes, "3", "8");
        a.extend(["--nnodes", "2", "--node-rank", node, "--master", &master]);
        kiln().args(&a).spawn().unwrap()
    };
    let (n0, n1) = (spawn("0"), spawn("1"));
    ok(n1.wait_with_output().unwrap());
    ok(n0.wait_with_output().unwrap());
    assert_same_weights(&final_model(&threads3), &final_model(Path::new(&nodes)));
}

/// A rank started by hand with the torchrun variables.
fn rank(rank: usize, world: usize, port: u16, extra: &[&str], data: &str, out: &str) -> Child {
    let mut a = args(data, out, "1", "100000");
    a.extend(extra);
    kiln()
        .args(&a)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("KILN_RENDEZVOUS_TIMEOUT", "5")
        .spawn()
        .unwrap()
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_killed_rank_stops_the_others_with_its_name() {
    let (dir, data, _) = common::tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let (data, out) = (p(&data), p(&dir.path().join("run")));
    let port = free_port(5);
    let r0 = rank(0, 2, port, &[], &data, &out);
    let mut r1 = rank(1, 2, port, &[], &data, &out);
    // Wait until training is under way, then kill rank 1 the hard way.
    let metrics = dir.path().join("run/metrics.jsonl");
    let started = Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("\"loss\"")) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    let _ = r1.wait();
    let (code, stderr, took) = wait_with_deadline(r0, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("rank 1"), "{stderr}");
    assert!(took < Duration::from_secs(30));
}

#[test]
fn setup_errors_are_clear_and_come_before_training() {
    let (dir, data, _) = common::tokenizer_and_shards();
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    let (data, out) = (p(&data), p(&dir.path().join("run")));

    // The master's port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, stderr, _) =
        wait_with_deadline(rank(0, 2, port, &[], &data, &out), Duration::from_secs(30));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("{port}")) && stderr.contains("in use"),
        "{stderr}"
    );

    // Nobody at the master: rank 1 gives up after the rendezvous timeout.
    let port = free_port(5);
    let (code, stderr, _) =
        wait_with_deadline(rank(1, 2, port, &[], &data, &out), Duration::from_secs(30));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("could not reach the master"), "{stderr}");

    // Rank 1 has another config.
    let port = free_port(5);
    let r0 = rank(0, 2, port, &[], &data, &out);
    let r1 = rank(1, 2, port, &["--seed", "7"], &data, &out);
    let (c0, e0, _) = wait_with_deadline(r0, Duration::from_secs(30));
    let (c1, e1, _) = wait_with_deadline(r1, Duration::from_secs(30));
    assert_eq!((c0, c1), (Some(1), Some(1)));
    assert!(e0.contains("rank 1's training config differs"), "{e0}");
    assert!(e1.contains("rank 1's training config differs"), "{e1}");
    assert!(
        !dir.path().join("run/metrics.jsonl").exists(),
        "no training happened"
    );

    // A bad launch plan.
    let out = kiln()
        .args([
            "train",
            "--config",
            config_path().to_str().unwrap(),
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node rank"));
}

/// The training losses a run logged (`log_interval = 1`), in step order.
fn logged_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.get("loss").and_then(serde_json::Value::as_f64)
        })
        .collect()
}

fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * x.abs().max(y.abs()),
            "{what}, step {i}: {x} vs {y} ({a:?} vs {b:?})"
        );
    }
}

/// `kiln train --nproc N` with tensor and pipeline parallelism in the config trains as one
/// process does (same losses, same final weights), resumes exactly, and says what it needs.
#[test]
fn tensor_and_pipeline_parallel_processes_train_like_one_process() {
    let (dir, data, _) = common::tokenizer_and_shards();
    let write_config = |name: &str, edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = TrainConfig::load(config_path()).unwrap();
        c.data_dir = data.clone();
        c.grad_accum = 2;
        c.max_steps = 6;
        c.decay_steps = Some(6);
        c.log_interval = 1;
        c.eval_interval = 0;
        c.eval_batches = 4;
        c.checkpoint_interval = 0;
        edit(&mut c);
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, c.to_toml().unwrap()).unwrap();
        path
    };
    let train = |config: &Path, run: &str, extra: &[&str]| {
        let out = dir.path().join(run);
        let mut a = vec![
            "train".to_owned(),
            "--config".into(),
            config.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        if extra.contains(&"--nproc") {
            a.extend(["--master".into(), format!("127.0.0.1:{}", free_port(8))]);
        }
        (ok(kiln().args(&a).output().unwrap()), out)
    };
    let final_model = |run: &Path| run.join("checkpoints/step-6/model");

    let single = write_config("single", &|_| {});
    let (_, one) = train(&single, "one", &[]);
    let reference = logged_losses(&one);
    assert_eq!(reference.len(), 6);

    for (name, tensor, pipeline, schedule) in [
        ("tp2", 2, 1, "1f1b"),
        ("pp2-1f1b", 1, 2, "1f1b"),
        ("pp2-gpipe", 1, 2, "gpipe"),
        ("tp2-pp2", 2, 2, "1f1b"),
    ] {
        let config = write_config(name, &|c| {
            c.tensor_parallel = tensor;
            c.pipeline_parallel = pipeline;
            c.pipeline_schedule = schedule.into();
        });
        let ranks = (tensor * pipeline).to_string();
        let (err, run) = train(&config, name, &["--nproc", &ranks]);
        assert!(
            err.contains(&format!("tensor {tensor} × pipeline {pipeline}")),
            "{err}"
        );
        assert_close(name, &logged_losses(&run), &reference, 1e-4);
        assert_same_weights_within(&final_model(&one), &final_model(&run), 1e-4);
    }

    // Data × tensor: 2 replicas of a TP 2 pair at 8 rows each = one process at 16 rows.
    let wide = write_config("single-16", &|c| c.micro_batch = 16);
    let (_, one16) = train(&wide, "one-16", &[]);
    let dp_tp = write_config("dp2-tp2", &|c| c.tensor_parallel = 2);
    let (err, run) = train(&dp_tp, "dp2-tp2", &["--nproc", "4"]);
    assert!(err.contains("× data 2"), "{err}");
    assert_close(
        "dp2-tp2",
        &logged_losses(&run),
        &logged_losses(&one16),
        1e-4,
    );

    // Resume: 3 steps, then on to 6 from the checkpoint, gives the 6-step run's losses exactly.
    let pp = write_config("pp2-resume", &|c| c.pipeline_parallel = 2);
    let (_, whole) = train(&pp, "pp2-whole", &["--nproc", "2"]);
    let (_, part) = train(&pp, "pp2-part", &["--nproc", "2", "--max-steps", "3"]);
    let port = format!("127.0.0.1:{}", free_port(8));
    ok(kiln()
        .args([
            "train",
            "--resume",
            part.to_str().unwrap(),
            "--max-steps",
            "6",
            "--nproc",
            "2",
            "--master",
            &port,
        ])
        .output()
        .unwrap());
    assert_eq!(logged_losses(&part), logged_losses(&whole));
    assert_same_weights_within(&final_model(&whole), &final_model(&part), 0.0);

    // One process cannot hold two tensor-parallel shards.
    let tp = write_config("tp2-alone", &|c| c.tensor_parallel = 2);
    let out = kiln()
        .args(["train", "--config", tp.to_str().unwrap(), "--out"])
        .arg(dir.path().join("alone"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs 2 ranks") && err.contains("--nproc 2"),
        "{err}"
    );
    // Heads that do not split: a clear error before any training.
    let bad = write_config("tp3", &|c| c.tensor_parallel = 3);
    let port = format!("127.0.0.1:{}", free_port(8));
    let out = kiln()
        .args([
            "train",
            "--config",
            bad.to_str().unwrap(),
            "--nproc",
            "3",
            "--master",
            &port,
            "--out",
        ])
        .arg(dir.path().join("tp3"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heads"), "{err}");
    assert!(!dir.path().join("tp3/metrics.jsonl").exists());
}
