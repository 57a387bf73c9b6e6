//! Container and block-blob operations of [`AzureBlobs`], plus those that work on any blob
//! (read, list, size, delete).

use std::num::NonZero;

use azure_core::http::{Body, Etag};
use azure_core::Bytes;
use azure_storage_blob::models::{
    BlobClientDeleteOptions, BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobContainerClientListBlobsOptions, BlockBlobClientUploadOptions, DeleteSnapshotsOptionType,
    HttpRange,
};
use futures::TryStreamExt;

use crate::client::{AzureBlobs, Shared};
use crate::error::{AzureError, Result};

/// Block blobs up to this size go up in one Put Blob request (atomic, one round trip).
const SINGLE_PUT_MAX: u64 = 64 * 1024 * 1024;

/// Map 404 to `None`.
pub(crate) fn not_found_as_none<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl AzureBlobs {
    /// Create the container if it does not exist.
    pub fn ensure_container(&self) -> Result<()> {
        self.run(|s| async move {
            let cc = s.container_client()?;
            let name = s.container.clone();
            s.retry("ensure_container", &name, |_| async {
                match cc.create(None).await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let e = AzureError::from_sdk("ensure_container", &name, e);
                        if e.service_code() == Some("ContainerAlreadyExists") {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    }
                }
            })
            .await
        })
    }

    /// Upload `data` as block blob `name`, replacing any existing blob. Throttled; counted.
    pub fn put_block_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let name = name.to_string();
        self.run(|s| async move {
            let client = s.blob_client("put_block_blob", &name)?.block_blob_client();
            let bytes = Bytes::from(data);
            let len = bytes.len() as u64;
            let parallel = NonZero::new(s.tuning.parallelism).unwrap_or(NonZero::<usize>::MIN);
            s.retry("put_block_blob", &name, |_| {
                let bytes = bytes.clone();
                let (s, client, name) = (&s, &client, &name);
                async move {
                    s.throttle("put_block_blob", name, len).await?;
                    let options = BlockBlobClientUploadOptions {
                        partition_size: NonZero::new(SINGLE_PUT_MAX),
                        parallel: Some(parallel),
                        ..Default::default()
                    };
                    client
                        .upload(Body::Bytes(bytes).into(), Some(options))
                        .await
                        .map(|_| ())
                        .map_err(|e| AzureError::from_sdk("put_block_blob", name, e))
                }
            })
            .await
        })
    }

    /// Creates block blob `name` with `data` only if no blob of that name exists (`If-None-Match:
    /// *`, one request): `true` if this call created it, `false` if it was there already (then its
    /// content is left as it is). Two processes racing to create a marker: exactly one wins; the
    /// other reads the winner's. A retry after a lost response also answers `false`: read the blob
    /// to learn what it holds.
    pub fn create_block_blob(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        const OP: &str = "create_block_blob";
        if data.len() as u64 > SINGLE_PUT_MAX {
            return Err(AzureError::invalid(
                OP,
                name,
                format!("{} bytes is more than one request carries", data.len()),
            ));
        }
        let name = name.to_string();
        self.run(|s| async move {
            let client = s.blob_client(OP, &name)?.block_blob_client();
            let bytes = Bytes::from(data);
            let len = bytes.len() as u64;
            s.retry(OP, &name, |_| {
                let bytes = bytes.clone();
                let (s, client, name) = (&s, &client, &name);
                async move {
                    s.throttle(OP, name, len).await?;
                    let options = BlockBlobClientUploadOptions {
                        partition_size: NonZero::new(SINGLE_PUT_MAX),
                        if_none_match: Some(Etag::from("*")),
                        ..Default::default()
                    };
                    match client
                        .upload(Body::Bytes(bytes).into(), Some(options))
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(e) => {
                            let e = AzureError::from_sdk(OP, name, e);
                            match e.service_code() {
                                Some("BlobAlreadyExists") | Some("ConditionNotMet") => Ok(false),
                                _ => Err(e),
                            }
                        }
                    }
                }
            })
            .await
        })
    }

    /// The whole blob, or `None` if it does not exist.
    pub fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = name.to_string();
        self.run(|s| async move {
            let client = s.blob_client("get_blob", &name)?;
            let r = s
                .retry("get_blob", &name, |_| async {
                    let map = |e| AzureError::from_sdk("get_blob", &name, e);
                    let rsp = client.download(None).await.map_err(map)?;
                    let body = rsp.body.collect().await.map_err(map)?;
                    Ok(body.to_vec())
                })
                .await;
            let r = not_found_as_none(r)?;
            if let Some(v) = &r {
                s.counters.add_received(v.len() as u64);
            }
            Ok(r)
        })
    }

    /// `len` bytes at `offset` of blob `name` (or of its `snapshot`). Shorter only if the
    /// blob ends first; a range starting past the end is an error (HTTP 416).
    pub fn get_range(
        &self,
        name: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let len_usize = usize::try_from(len)
            .map_err(|_| AzureError::invalid("get_range", name, "length does not fit in memory"))?;
        let name = name.to_string();
        let snapshot = snapshot.map(str::to_string);
        self.run(move |s| async move {
            let client = s.blob_client("get_range", &name)?;
            let out = s
                .retry("get_range", &name, |_| async {
                    let mut buf = vec![0u8; len_usize];
                    let options = BlobClientDownloadOptions {
                        range: Some(HttpRange::new(offset, len)),
                        snapshot: snapshot.clone(),
                        ..Default::default()
                    };
                    let r = client
                        .download_into(&mut buf, Some(options))
                        .await
                        .map_err(|e| AzureError::from_sdk("get_range", &name, e))?;
                    buf.truncate(r.len.min(len_usize));
                    Ok(buf)
                })
                .await?;
            s.counters.add_received(out.len() as u64);
            Ok(out)
        })
    }

    /// Every blob whose name starts with `prefix`, with its size, in name order (all result
    /// pages; each page is retried on its own).
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let prefix = prefix.to_string();
        self.run(|s| async move {
            let cc = s.container_client()?;
            let mut out = Vec::new();
            let mut marker: Option<String> = None;
            loop {
                let page = s
                    .retry("list", &prefix, |_| async {
                        let map = |e| AzureError::from_sdk("list", &prefix, e);
                        let options = BlobContainerClientListBlobsOptions {
                            prefix: (!prefix.is_empty()).then(|| prefix.clone()),
                            marker: marker.clone(),
                            maxresults: s.tuning.list_page_size.and_then(|n| i32::try_from(n).ok()),
                            ..Default::default()
                        };
                        let mut pages = cc.list_blobs(Some(options)).map_err(map)?.into_pages();
                        match pages.try_next().await.map_err(map)? {
                            Some(rsp) => rsp.into_model().map_err(map).map(Some),
                            None => Ok(None),
                        }
                    })
                    .await?;
                let Some(page) = page else { break };
                for item in page.blob_items {
                    let name = item.name.ok_or_else(|| {
                        AzureError::protocol("list", &prefix, "blob without a name")
                    })?;
                    let size = item.properties.and_then(|p| p.content_length).unwrap_or(0);
                    out.push((name, size));
                }
                marker = page.next_marker.filter(|m| !m.is_empty());
                if marker.is_none() {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Delete blob `name` and all its snapshots. Deleting a missing blob is not an error.
    pub fn delete_blob(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.run(|s| async move {
            let client = s.blob_client("delete_blob", &name)?;
            let r = s
                .retry("delete_blob", &name, |_| async {
                    let options = BlobClientDeleteOptions {
                        delete_snapshots: Some(DeleteSnapshotsOptionType::Include),
                        ..Default::default()
                    };
                    client
                        .delete(Some(options))
                        .await
                        .map(|_| ())
                        .map_err(|e| AzureError::from_sdk("delete_blob", &name, e))
                })
                .await;
            not_found_as_none(r).map(|_| ())
        })
    }

    /// Size in bytes of blob `name`, or `None` if it does not exist.
    pub fn blob_size(&self, name: &str) -> Result<Option<u64>> {
        let name = name.to_string();
        self.run(|s| async move {
            s.properties("blob_size", &name)
                .await
                .map(|p| p.map(|p| p.size))
        })
    }
}

/// The few blob properties Ferry looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Props {
    pub(crate) size: u64,
    pub(crate) is_page_blob: bool,
    pub(crate) copy_status: Option<String>,
    pub(crate) copy_description: Option<String>,
}

impl Shared {
    /// Get Blob Properties, retried; `None` if the blob does not exist.
    pub(crate) async fn properties(&self, op: &'static str, name: &str) -> Result<Option<Props>> {
        let client = self.blob_client(op, name)?;
        let r = self
            .retry(op, name, |_| async {
                let map = |e| AzureError::from_sdk(op, name, e);
                let rsp = client.get_properties(None).await.map_err(map)?;
                let size = rsp
                    .content_length()
                    .map_err(map)?
                    .ok_or_else(|| AzureError::protocol(op, name, "no Content-Length"))?;
                let is_page_blob = rsp
                    .blob_type()
                    .map_err(map)?
                    .is_some_and(|t| t.to_string() == "PageBlob");
                Ok(Props {
                    size,
                    is_page_blob,
                    copy_status: rsp.copy_status().map_err(map)?.map(|c| c.to_string()),
                    copy_description: rsp.copy_status_description().map_err(map)?,
                })
            })
            .await;
        not_found_as_none(r)
    }
}
