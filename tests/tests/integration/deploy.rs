//! The deployment files cannot run here (no Docker daemon or cluster in
//! CI), so these tests check what can be checked: every manifest parses,
//! names and ports agree across files, the configuration the container and
//! the ConfigMap carry is a valid wasmq config, and the Dockerfile uses
//! only real instructions and files that exist.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs(file: &str) -> Vec<Yaml> {
    let path = repo().join("deploy/k8s").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

#[test]
fn kubernetes_manifests_parse_and_agree() {
    let kustomization = docs("kustomization.yaml");
    let files: Vec<&str> = kustomization[0]["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let all: Vec<Yaml> = files.iter().flat_map(|f| docs(f)).collect();
    for d in &all {
        assert!(d["apiVersion"].as_str().is_some(), "apiVersion in {d:?}");
        assert!(
            d["metadata"]["name"].as_str().is_some(),
            "metadata.name in {d:?}"
        );
    }

    let sts = kind(&all, "StatefulSet");
    assert_eq!(sts.len(), 1);
    let sts = sts[0];
    let pod = &sts["spec"]["template"];
    assert_eq!(
        sts["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"],
        "the selector matches the pod labels"
    );
    // Every ConfigMap the pod mounts is defined.
    let configmaps: Vec<&str> = kind(&all, "ConfigMap")
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let volumes = pod["spec"]["volumes"].as_vec().unwrap();
    for v in volumes {
        if let Some(name) = v["configMap"]["name"].as_str() {
            assert!(configmaps.contains(&name), "ConfigMap {name} is defined");
        }
    }
    // Every mount names a volume or a claim template.
    let container = &pod["spec"]["containers"][0];
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let mut mounts = std::collections::HashMap::new();
    for m in container["volumeMounts"].as_vec().unwrap() {
        let name = m["name"].as_str().unwrap();
        assert!(
            volumes.iter().any(|v| v["name"].as_str() == Some(name)) || claims.contains(&name),
            "volume {name} exists"
        );
        mounts.insert(name, m["mountPath"].as_str().unwrap());
    }
    // The config the pod reads is valid, and its folders are the mounts.
    let config_cm = kind(&all, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == Some("wasmq-config"))
        .unwrap();
    let text = config_cm["data"]["wasmq.toml"].as_str().unwrap();
    let config = wasmq::Config::parse(text, "ConfigMap wasmq-config").unwrap();
    assert_eq!(config.data_dir, Path::new(mounts["data"]));
    assert_eq!(config.plugin_dir, Path::new(mounts["plugins"]));
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(
        Path::new(config_path).parent().unwrap(),
        Path::new(mounts["config"])
    );
    // Service ports target named container ports.
    let port_names: Vec<&str> = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for svc in kind(&all, "Service") {
        for p in svc["spec"]["ports"].as_vec().unwrap() {
            if let Some(target) = p["targetPort"].as_str() {
                assert!(port_names.contains(&target), "port {target}");
            }
        }
        assert_eq!(svc["spec"]["selector"], pod["metadata"]["labels"]);
    }
    assert_eq!(
        sts["spec"]["serviceName"].as_str(),
        kind(&all, "Service")
            .iter()
            .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
            .map(|s| s["metadata"]["name"].as_str().unwrap())
    );

    // The cluster: three pods that find each other through the headless
    // Service (ready or not), each named and addressed by the pod, with
    // the secret mounted where the config reads it.
    let headless = sts["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(sts["spec"]["replicas"].as_i64(), Some(3));
    let cluster = config.cluster.as_ref().expect("[cluster] in the ConfigMap");
    assert_eq!(cluster.peer_dns.as_deref(), Some(headless));
    let sts_name = sts["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        cluster.bootstrap_node.as_deref(),
        Some(&*format!("{sts_name}-0"))
    );
    let headless_svc = kind(&all, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(headless))
        .unwrap();
    assert_eq!(
        headless_svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let cluster_port = cluster
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert_eq!(cluster.peer_port as i64, cluster_port);
    assert!(
        headless_svc["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_i64() == Some(cluster_port)),
        "the headless Service carries the cluster port"
    );
    assert!(
        container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"].as_i64() == Some(cluster_port))
    );
    let env: std::collections::HashMap<&str, &Yaml> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["WASMQ_CLUSTER_NAME"]["value"].as_str(),
        Some("$(POD_NAME)")
    );
    let advertise = env["WASMQ_CLUSTER_ADVERTISE"]["value"].as_str().unwrap();
    assert!(
        advertise.starts_with(&format!("$(POD_NAME).{headless}."))
            && advertise.ends_with(&format!(":{cluster_port}")),
        "{advertise}"
    );
    let secret_dir = cluster.secret_file.as_ref().unwrap().parent().unwrap();
    assert_eq!(Path::new(mounts["secret"]), secret_dir);
    let secret_volume = volumes
        .iter()
        .find(|v| v["name"].as_str() == Some("secret"))
        .unwrap();
    let secret_name = secret_volume["secret"]["secretName"].as_str().unwrap();
    let secret = kind(&all, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(secret_name))
        .expect("the Secret is defined");
    let file = cluster
        .secret_file
        .as_ref()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        secret["stringData"][file]
            .as_str()
            .is_some_and(|c| c.len() >= 16)
    );
    // Ready once joined; at most one pod down by choice, so two of three
    // keep the majority.
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    let pdb = kind(&all, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert_eq!(pdb[0]["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_eq!(
        pdb[0]["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );
}

#[test]
fn the_container_config_is_valid_and_matches_the_configmap() {
    let path = repo().join("deploy/wasmq.toml");
    let file = wasmq::Config::from_file(&path).unwrap();
    let cm = docs("configmap.yaml");
    let text = cm[0]["data"]["wasmq.toml"].as_str().unwrap();
    let mut from_cm = wasmq::Config::parse(text, "ConfigMap").unwrap();
    // The ConfigMap adds the [cluster] section; a single container runs
    // alone.
    assert!(file.cluster.is_none() && from_cm.cluster.take().is_some());
    assert_eq!(format!("{file:?}"), format!("{from_cm:?}"));
}

#[test]
fn the_dockerfile_uses_real_instructions_and_files() {
    const INSTRUCTIONS: &[&str] = &[
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    ];
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let mut continued = false;
    let mut stages = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !continued {
            let word = trimmed.split_whitespace().next().unwrap();
            assert!(INSTRUCTIONS.contains(&word), "unknown instruction: {line}");
            if word == "FROM" {
                stages += 1;
            }
            if word == "COPY" && !trimmed.contains("--from") {
                let src = trimmed.split_whitespace().nth(1).unwrap();
                assert!(repo().join(src).exists(), "COPY source {src} exists");
            }
        }
        continued = trimmed.ends_with('\\');
    }
    assert_eq!(stages, 2, "a build stage and a runtime stage");
    // The entrypoint's subcommand and flags exist in the binary.
    assert!(text.contains(r#""serve", "--config""#));
}

#[test]
fn the_complete_file_in_the_configuration_docs_parses() {
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let section = doc.split("## A complete file").nth(1).expect("section");
    let toml = section
        .split("```toml")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a toml block");
    let c = wasmq::Config::parse(toml, "docs/configuration.md").unwrap();
    let d = wasmq::Config::default();
    // The documented values are the defaults (bar the folders and user).
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.admin.listen, d.admin.listen);
    assert_eq!(c.amqp.heartbeat_secs, d.amqp.heartbeat_secs);
    assert_eq!(c.amqp.frame_max, d.amqp.frame_max);
    assert_eq!(c.amqp.channel_max, d.amqp.channel_max);
    assert_eq!(c.amqp.queue_flow_bytes, d.amqp.queue_flow_bytes);
    assert_eq!(c.store.segment_mib, d.store.segment_mib);
    assert_eq!(c.plugins.limits().deadline, d.plugins.limits().deadline);
    assert_eq!(
        c.plugins.limits().setup_deadline,
        d.plugins.limits().setup_deadline
    );
    assert_eq!(c.users[0].vhosts, ["/", "orders"]);
}
