//! Page-blob operations of [`AzureBlobs`]: create, put/clear pages, page ranges, snapshots and
//! server-side copy from a snapshot.

use std::time::{Duration, Instant};

use azure_core::http::{Body, Etag};
use azure_core::Bytes;
use azure_storage_blob::models::{
    BlobClientCreateSnapshotResultHeaders, BlobClientStartCopyFromUrlResultHeaders, HttpRange,
    PageBlobClientCreateOptions, PageBlobClientListPageRangesOptions,
};
use azure_storage_blob::PageBlobClient;
use futures::{StreamExt, TryStreamExt};

use crate::blocks::not_found_as_none;
use crate::client::{AzureBlobs, Shared};
use crate::error::{AzureError, Result};
use crate::pages::{check_aligned, coalesce, merge_ranges, MAX_PUT_PAGES, PAGE};

impl AzureBlobs {
    /// Create page blob `name` of `size` bytes (a multiple of 512), zero-filled. A no-op if it
    /// already exists with that size; an error if it exists with another size or type.
    pub fn create_page_blob(&self, name: &str, size: u64) -> Result<()> {
        const OP: &str = "create_page_blob";
        if !size.is_multiple_of(PAGE) {
            return Err(AzureError::invalid(
                OP,
                name,
                format!("size {size} is not a multiple of 512"),
            ));
        }
        let name = name.to_string();
        self.run(move |s| async move {
            let client = s.page_client(OP, &name)?;
            let created = s
                .retry(OP, &name, |_| async {
                    let options = PageBlobClientCreateOptions {
                        if_none_match: Some(Etag::from("*")),
                        ..Default::default()
                    };
                    match client.create(size, Some(options)).await {
                        Ok(_) => Ok(true),
                        Err(e) => {
                            let e = AzureError::from_sdk(OP, &name, e);
                            match e.service_code() {
                                Some("BlobAlreadyExists") | Some("ConditionNotMet") => Ok(false),
                                _ => Err(e),
                            }
                        }
                    }
                })
                .await?;
            if created {
                return Ok(());
            }
            // It was there already (or an earlier attempt created it): check what it is.
            match s.properties(OP, &name).await? {
                Some(p) if !p.is_page_blob => Err(AzureError::invalid(
                    OP,
                    &name,
                    "a blob of another type (not a page blob) exists under this name",
                )),
                Some(p) if p.size != size => Err(AzureError::SizeMismatch {
                    blob: name.clone(),
                    existing: p.size,
                    wanted: size,
                }),
                Some(_) => Ok(()),
                None => Err(AzureError::protocol(
                    OP,
                    &name,
                    "the service said the blob exists, then that it does not (deleted meanwhile?)",
                )),
            }
        })
    }

    /// Write `data` at `offset` of page blob `name`. Offset and length must be multiples of
    /// 512 and the length at most 4 MiB. Throttled; counted.
    pub fn put_pages(&self, name: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        const OP: &str = "put_pages";
        check_aligned(OP, name, offset, data.len() as u64)?;
        if data.len() as u64 > MAX_PUT_PAGES {
            return Err(AzureError::invalid(
                OP,
                name,
                format!(
                    "{} bytes is more than 4 MiB; use put_pages_many",
                    data.len()
                ),
            ));
        }
        let name = name.to_string();
        self.run(move |s| async move {
            let client = s.page_client(OP, &name)?;
            s.put_one(OP, &client, &name, offset, Bytes::from(data))
                .await
        })
    }

    /// Write many `(offset, data)` ranges to page blob `name`: validated (512-aligned, no
    /// overlaps — a bad range fails the whole call before anything is sent), merged into runs
    /// of up to 4 MiB, and uploaded with `tuning.parallelism` requests in flight. Returns when
    /// every range is written, or with the first error that retries could not fix.
    pub fn put_pages_many(&self, name: &str, ranges: Vec<(u64, Vec<u8>)>) -> Result<()> {
        const OP: &str = "put_pages_many";
        let runs = coalesce(OP, name, ranges, MAX_PUT_PAGES)?;
        if runs.is_empty() {
            return Ok(());
        }
        let name = name.to_string();
        self.run(move |s| async move {
            let client = s.page_client(OP, &name)?;
            let parallel = s.tuning.parallelism.max(1);
            futures::stream::iter(runs)
                .map(|(off, data)| s.put_one(OP, &client, &name, off, Bytes::from(data)))
                .buffer_unordered(parallel)
                .try_for_each(|()| async { Ok(()) })
                .await
        })
    }

    /// Zero (deallocate) `len` bytes at `offset` of page blob `name`; both multiples of 512.
    pub fn clear_pages(&self, name: &str, offset: u64, len: u64) -> Result<()> {
        const OP: &str = "clear_pages";
        check_aligned(OP, name, offset, len)?;
        let name = name.to_string();
        self.run(move |s| async move {
            let client = s.page_client(OP, &name)?;
            s.retry(OP, &name, |_| async {
                client
                    .clear_pages(HttpRange::new(offset, len), None)
                    .await
                    .map(|_| ())
                    .map_err(|e| AzureError::from_sdk(OP, &name, e))
            })
            .await
        })
    }

    /// Written ranges of page blob `name` (or of its `snapshot`) as `(start, end)` byte
    /// offsets, end exclusive, sorted, touching ranges merged.
    pub fn list_page_ranges(&self, name: &str, snapshot: Option<&str>) -> Result<Vec<(u64, u64)>> {
        const OP: &str = "list_page_ranges";
        let name = name.to_string();
        let snapshot = snapshot.map(str::to_string);
        self.run(move |s| async move {
            let client = s.page_client(OP, &name)?;
            let mut out = Vec::new();
            let mut marker: Option<String> = None;
            loop {
                let page = s
                    .retry(OP, &name, |_| async {
                        let map = |e| AzureError::from_sdk(OP, &name, e);
                        let options = PageBlobClientListPageRangesOptions {
                            snapshot: snapshot.clone(),
                            marker: marker.clone(),
                            maxresults: s.tuning.list_page_size.and_then(|n| i32::try_from(n).ok()),
                            ..Default::default()
                        };
                        let mut pages = client.list_page_ranges(Some(options)).map_err(map)?;
                        match pages.try_next().await.map_err(map)? {
                            Some(rsp) => rsp.into_model().map_err(map).map(Some),
                            None => Ok(None),
                        }
                    })
                    .await?;
                let Some(page) = page else { break };
                for r in &page.page_ranges {
                    match (r.start, r.end) {
                        (Some(a), Some(b)) if a >= 0 && b >= a => {
                            out.push((a as u64, (b - a + 1) as u64));
                        }
                        other => {
                            return Err(AzureError::protocol(
                                OP,
                                &name,
                                format!("bad page range {other:?}"),
                            ))
                        }
                    }
                }
                marker = page.next_marker.filter(|m| !m.is_empty());
                if marker.is_none() {
                    break;
                }
            }
            Ok(merge_ranges(out)
                .into_iter()
                .map(|(off, len)| (off, off + len))
                .collect())
        })
    }

    /// Take a snapshot of blob `name`; returns the snapshot id (a timestamp string). A retry
    /// after a lost response may leave one extra, unreferenced snapshot (deleted with the blob).
    pub fn snapshot(&self, name: &str) -> Result<String> {
        const OP: &str = "snapshot";
        let name = name.to_string();
        self.run(move |s| async move {
            let client = s.blob_client(OP, &name)?;
            s.retry(OP, &name, |_| async {
                let map = |e| AzureError::from_sdk(OP, &name, e);
                let rsp = client.create_snapshot(None).await.map_err(map)?;
                rsp.snapshot()
                    .map_err(map)?
                    .ok_or_else(|| AzureError::protocol(OP, &name, "no x-ms-snapshot header"))
            })
            .await
        })
    }

    /// Delete one snapshot of blob `name`. A missing snapshot is not an error.
    pub fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        const OP: &str = "delete_snapshot";
        let name = name.to_string();
        let snapshot = snapshot.to_string();
        self.run(move |s| async move {
            let client = s
                .blob_client(OP, &name)?
                .with_snapshot(&snapshot)
                .map_err(|e| AzureError::from_sdk(OP, &name, e))?;
            let r = s
                .retry(OP, &name, |_| async {
                    client
                        .delete(None)
                        .await
                        .map(|_| ())
                        .map_err(|e| AzureError::from_sdk(OP, &name, e))
                })
                .await;
            not_found_as_none(r).map(|_| ())
        })
    }

    /// Server-side copy of `src` at `snapshot` to a new (or replaced) blob `dst` in the same
    /// container; waits until the copy status is `success` (bounded by `tuning.copy_timeout`
    /// and the cancel token). No data passes through this machine.
    pub fn copy_from_snapshot(&self, src: &str, snapshot: &str, dst: &str) -> Result<()> {
        const OP: &str = "copy_from_snapshot";
        let (src, snapshot, dst) = (src.to_string(), snapshot.to_string(), dst.to_string());
        self.run(move |s| async move {
            let source = s.source_url(OP, &src, &snapshot)?;
            let client = s.blob_client(OP, &dst)?;
            let started = s
                .retry(OP, &dst, |_| async {
                    let map = |e| AzureError::from_sdk(OP, &dst, e);
                    let rsp = client
                        .start_copy_from_url(source.to_string(), None)
                        .await
                        .map_err(map)?;
                    Ok(rsp.copy_status().map_err(map)?.map(|c| c.to_string()))
                })
                .await?;
            if started.as_deref() == Some("success") {
                return Ok(());
            }
            s.wait_for_copy(&src, &snapshot, &dst).await
        })
    }
}

impl Shared {
    /// One Put Page request, throttled and retried.
    async fn put_one(
        &self,
        op: &'static str,
        client: &PageBlobClient,
        name: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<()> {
        let len = data.len() as u64;
        self.retry(op, name, |_| {
            let data = data.clone();
            async move {
                self.throttle(op, name, len).await?;
                client
                    .upload_pages(
                        Body::Bytes(data).into(),
                        len,
                        HttpRange::new(offset, len),
                        None,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| AzureError::from_sdk(op, name, e))
            }
        })
        .await
    }

    /// Poll the destination's copy status until it leaves `pending`.
    async fn wait_for_copy(&self, src: &str, snapshot: &str, dst: &str) -> Result<()> {
        const OP: &str = "copy_from_snapshot";
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let props = self
                .properties(OP, dst)
                .await?
                .ok_or_else(|| AzureError::NotFound {
                    op: OP,
                    blob: dst.to_string(),
                    code: "copy destination vanished".to_string(),
                })?;
            let status = props.copy_status.unwrap_or_default();
            match status.as_str() {
                "success" => return Ok(()),
                "pending" | "" => {}
                _ => {
                    return Err(AzureError::CopyFailed {
                        src: src.to_string(),
                        snapshot: snapshot.to_string(),
                        dst: dst.to_string(),
                        status,
                        description: crate::error::redact(
                            &props.copy_description.unwrap_or_default(),
                        ),
                    })
                }
            }
            if started.elapsed() > self.tuning.copy_timeout {
                return Err(AzureError::CopyFailed {
                    src: src.to_string(),
                    snapshot: snapshot.to_string(),
                    dst: dst.to_string(),
                    status: "pending".to_string(),
                    description: format!(
                        "still pending after {:?} (tuning.copy_timeout)",
                        self.tuning.copy_timeout
                    ),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => {
                    return Err(AzureError::Cancelled { op: OP, blob: dst.to_string() })
                }
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}
