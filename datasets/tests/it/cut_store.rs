//! An object store that cuts every GET body short after a number of bytes and then fails
//! the read, as a reset connection does: what a reader must tell apart from a broken
//! container.

use futures::future::ready;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, Error, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::sync::Arc;

/// `inner`, with every GET body failing after `after` bytes.
#[derive(Debug)]
pub struct CutBodies {
    pub inner: Arc<dyn ObjectStore>,
    pub after: u64,
}

impl std::fmt::Display for CutBodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CutBodies({}, after {} bytes)", self.inner, self.after)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CutBodies {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut got = self.inner.get_opts(location, options).await?;
        let body = match std::mem::replace(
            &mut got.payload,
            GetResultPayload::Stream(stream::empty().boxed()),
        ) {
            GetResultPayload::Stream(s) => s,
            #[allow(unreachable_patterns)]
            _ => panic!("CutBodies wraps stores that answer with streams (memory://, s3://)"),
        };
        let kept = body.scan(self.after, |left, chunk| {
            ready(match chunk {
                Ok(_) if *left == 0 => None,
                Ok(bytes) => {
                    let n = (bytes.len() as u64).min(*left);
                    *left -= n;
                    Some(Ok(bytes.slice(..n as usize)))
                }
                Err(e) => Some(Err(e)),
            })
        });
        let reset = stream::once(ready(Err(Error::Generic {
            store: "cut",
            source: "connection reset by peer".into(),
        })));
        got.payload = GetResultPayload::Stream(kept.chain(reset).boxed());
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
