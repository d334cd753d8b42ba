//! The Kubernetes client: from `--kubeconfig PATH`, or inferred (`KUBECONFIG`, `~/.kube/config`,
//! then the in-cluster service account), with a [`Liveness`] probe in its tower stack.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use kube::Client;
use kube::client::ClientBuilder;
use kube::config::{Config, InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("no kubeconfig given and none found (KUBECONFIG, ~/.kube/config, in-cluster)")]
    Infer(#[source] InferConfigError),
    #[error("building the Kubernetes client")]
    Build(#[source] kube::Error),
}

/// A failure seen talking to the API server.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: Instant,
    pub wall: SystemTime,
    pub error: String,
}

/// What the last requests to the API server got: every HTTP response below 500 counts as an
/// answer (403 and 410 included: the server is there); a connection error or a 5xx as a
/// failure. Watch responses count when their headers arrive.
#[derive(Debug, Default)]
pub struct Liveness {
    inner: Mutex<LivenessInner>,
}

#[derive(Debug, Default)]
struct LivenessInner {
    last_answer: Option<Instant>,
    last_failure: Option<Failure>,
}

impl Liveness {
    pub fn answered(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.last_answer = Some(Instant::now());
        }
    }

    pub fn failed(&self, error: String) {
        if let Ok(mut g) = self.inner.lock() {
            g.last_failure = Some(Failure {
                at: Instant::now(),
                wall: SystemTime::now(),
                error,
            });
        }
    }

    pub fn last_answer(&self) -> Option<Instant> {
        self.inner.lock().ok().and_then(|g| g.last_answer)
    }

    pub fn last_failure(&self) -> Option<Failure> {
        self.inner.lock().ok().and_then(|g| g.last_failure.clone())
    }
}

/// The client config: from `kubeconfig` when given, else inferred.
pub async fn config(kubeconfig: Option<&Path>) -> Result<Config, ClientError> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })
        }
        None => Config::infer().await.map_err(ClientError::Infer),
    }
}

/// A client for `config` that reports every request's outcome to `liveness`.
pub fn client(config: Config, liveness: Arc<Liveness>) -> Result<Client, ClientError> {
    let layer = tower::util::MapResultLayer::new(
        move |r: Result<http::Response<Box<kube::client::DynBody>>, tower::BoxError>| {
            match &r {
                Ok(resp) if resp.status().is_server_error() => {
                    liveness.failed(format!("API server answered {}", resp.status()))
                }
                Ok(_) => liveness.answered(),
                Err(e) => liveness.failed(error_chain(e.as_ref())),
            }
            r
        },
    );
    Ok(ClientBuilder::try_from(config)
        .map_err(ClientError::Build)?
        .with_layer(&layer)
        .build())
}

pub use crate::error_chain;
