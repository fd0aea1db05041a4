//! A client of the node's container runtime (CRI `RuntimeService` v1, over its Unix socket):
//! the pod sandboxes and containers it runs, with their metadata.

use crate::model::text::error_chain;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerEventResponse, GetEventsRequest,
    ListContainersRequest, ListPodSandboxRequest, VersionRequest,
};
use std::{collections::BTreeMap, path::PathBuf, time::Duration};
use tonic::transport::Channel;

/// How long one CRI call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A pod sandbox as the runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The runtime's sandbox id.
    pub id: String,
    /// The pod's UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A container as the runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeContainer {
    /// The runtime's container id.
    pub id: String,
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// Its name in the pod spec.
    pub name: String,
}

/// Everything the runtime runs now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Pod sandboxes.
    pub sandboxes: Vec<Sandbox>,
    /// Containers.
    pub containers: Vec<RuntimeContainer>,
}

/// A connection to the runtime, made lazily and remade after a failure.
#[derive(Debug)]
pub struct Runtime {
    socket: PathBuf,
    client: Option<RuntimeServiceClient<Channel>>,
    /// `name version` once known.
    pub name: Option<String>,
}

impl Runtime {
    /// A runtime at `socket` (nothing is connected yet).
    pub fn new(socket: PathBuf) -> Runtime {
        Runtime {
            socket,
            client: None,
            name: None,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    async fn client(&mut self) -> Result<&mut RuntimeServiceClient<Channel>, String> {
        if self.client.is_none() {
            let path = self.socket.clone();
            let channel = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(&path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
            let mut client = RuntimeServiceClient::new(channel);
            let v = client
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await
                .map_err(|s| format!("Version: {}", s.message()))?
                .into_inner();
            self.name = Some(format!("{} {}", v.runtime_name, v.runtime_version));
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "not connected".to_owned())
    }

    /// The runtime's container event stream (`GetContainerEvents`, containerd 1.7+ and CRI-O).
    /// `Ok(None)`: the runtime does not have it (containerd 1.6 answers UNIMPLEMENTED).
    pub async fn events(
        &mut self,
    ) -> Result<Option<tonic::Streaming<ContainerEventResponse>>, String> {
        let client = self.client().await?;
        // The stream outlives one call's timeout: a fresh client without it.
        let mut client = client.clone();
        match client.get_container_events(GetEventsRequest {}).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => {
                self.client = None;
                Err(format!("GetContainerEvents: {}", s.message()))
            }
        }
    }

    /// Every pod sandbox and container the runtime knows. On failure the connection is dropped
    /// (the next call reconnects) and the error says what failed.
    pub async fn list(&mut self) -> Result<Listing, String> {
        let result = self.list_once().await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn list_once(&mut self) -> Result<Listing, String> {
        let client = self.client().await?;
        let sandboxes = client
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| format!("ListPodSandbox: {}", s.message()))?
            .into_inner()
            .items
            .into_iter()
            .filter_map(|s| {
                let m = s.metadata?;
                Some(Sandbox {
                    id: s.id,
                    uid: m.uid,
                    namespace: m.namespace,
                    name: m.name,
                    labels: s.labels.into_iter().collect(),
                })
            })
            .collect();
        let containers = client
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(|s| format!("ListContainers: {}", s.message()))?
            .into_inner()
            .containers
            .into_iter()
            .filter_map(|c| {
                Some(RuntimeContainer {
                    name: c.metadata?.name,
                    id: c.id,
                    sandbox_id: c.pod_sandbox_id,
                })
            })
            .collect();
        Ok(Listing {
            sandboxes,
            containers,
        })
    }
}
