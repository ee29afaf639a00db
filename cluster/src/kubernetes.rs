//! The Kubernetes objects `submit` renders for the `kubernetes` backend, as typed structs
//! serialised to YAML: the part of the API the manifest uses (a ConfigMap holding the stage
//! config, a headless Service for the rendezvous, an Indexed Job), named and shaped as in
//! the API reference (`v1`, `batch/v1`), so a field that does not exist cannot be written.

use serde::Serialize;
use std::collections::BTreeMap;

/// One API object: `apiVersion`, `kind`, `metadata`, then the kind's own fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<B: Serialize> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ObjectMeta,
    #[serde(flatten)]
    pub body: B,
}

/// Where an object sits: its name and namespace.
#[derive(Serialize)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
}

impl<B: Serialize> Object<B> {
    /// `kind` of `api_version`, named `name` in `namespace`.
    pub fn new(
        api_version: &'static str,
        kind: &'static str,
        name: &str,
        ns: &str,
        body: B,
    ) -> Self {
        Object {
            api_version,
            kind,
            metadata: ObjectMeta {
                name: name.to_string(),
                namespace: ns.to_string(),
            },
            body,
        }
    }
}

/// A ConfigMap's `data`: file name → text.
#[derive(Serialize)]
pub struct ConfigMapBody {
    pub data: BTreeMap<String, String>,
}

/// A Service's `spec`.
#[derive(Serialize)]
pub struct ServiceBody {
    pub spec: ServiceSpec,
}

/// What a Service selects and exposes (`clusterIP: None` makes it headless: one DNS name per
/// pod).
#[derive(Serialize)]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: &'static str,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

/// One named port of a Service.
#[derive(Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
}

/// A Job's `spec`.
#[derive(Serialize)]
pub struct JobBody {
    pub spec: JobSpec,
}

/// How many pods a Job runs, how often it retries them, and the pod they run.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    pub completion_mode: &'static str,
    pub completions: usize,
    pub parallelism: usize,
    pub backoff_limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_failure_policy: Option<PodFailurePolicy>,
    pub template: PodTemplateSpec,
}

/// Which pod exits do not count against `backoffLimit`.
#[derive(Serialize)]
pub struct PodFailurePolicy {
    pub rules: Vec<PodFailurePolicyRule>,
}

/// One rule: `action` when a container exits with one of `values`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodFailurePolicyRule {
    pub action: &'static str,
    pub on_exit_codes: OnExitCodes,
}

/// The exit codes a rule matches.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OnExitCodes {
    pub container_name: String,
    pub operator: &'static str,
    pub values: Vec<i32>,
}

/// The pod a Job creates: its labels and spec.
#[derive(Serialize)]
pub struct PodTemplateSpec {
    pub metadata: PodMeta,
    pub spec: PodSpec,
}

/// A pod template's labels.
#[derive(Serialize)]
pub struct PodMeta {
    pub labels: BTreeMap<String, String>,
}

/// A pod: its containers and volumes, and how it is stopped and named.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub restart_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
    pub termination_grace_period_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    pub containers: Vec<Container>,
    pub volumes: Vec<Volume>,
}

/// One container of a pod.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    pub resources: ResourceRequirements,
    pub volume_mounts: Vec<VolumeMount>,
}

/// An environment variable set to a literal value.
#[derive(Serialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// Environment variables taken from a Secret's keys.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromSource {
    pub secret_ref: SecretRef,
}

/// A Secret, by name.
#[derive(Serialize)]
pub struct SecretRef {
    pub name: String,
}

/// A container's resource limits: resource name → quantity (`cpu: "2"`, `memory: "8Gi"`,
/// `nvidia.com/gpu: "1"`).
#[derive(Serialize)]
pub struct ResourceRequirements {
    pub limits: BTreeMap<String, String>,
}

/// Where a volume appears in a container.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

/// A pod's volume: its name and source.
#[derive(Serialize)]
pub struct Volume {
    pub name: String,
    #[serde(flatten)]
    pub source: VolumeSource,
}

/// What a volume holds.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSource {
    /// A ConfigMap's files.
    ConfigMap { name: String },
    /// A scratch directory for the pod's life (`medium: Memory`: tmpfs).
    EmptyDir { medium: &'static str },
}

/// A manifest: YAML documents separated by `---`, each after its comment lines (`# …`).
pub fn documents(docs: &[(Vec<String>, String)]) -> String {
    let mut out = String::new();
    for (i, (comments, yaml)) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        for c in comments {
            out.push_str("# ");
            out.push_str(c);
            out.push('\n');
        }
        out.push_str(yaml);
    }
    out
}

/// One object as a YAML document.
pub fn to_yaml<T: Serialize>(object: &T) -> String {
    // Every field is a string, number, list or map: serialising cannot fail.
    yaml_serde::to_string(object).expect("Kubernetes objects serialise to YAML")
}
