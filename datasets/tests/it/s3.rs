//! Reading from a real S3-protocol server on 127.0.0.1 (s3s-fs, SigV4).

use crate::fixtures::png;
use crate::s3_server::S3Server;
use futures::TryStreamExt;
use knn_datasets::{
    list_shards, read_shard, DatasetError, ListOptions, RawRecord, ReaderOptions, Secret,
    ShardFormat, SourceLocation, StorageConfig,
};

fn storage(server: &S3Server, secret: &str) -> StorageConfig {
    StorageConfig {
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        allow_http: true,
        access_key_id: Some(server.access_key.clone()),
        secret_access_key: Some(Secret::new(secret)),
        ..Default::default()
    }
}

#[tokio::test]
async fn reads_folder_shards_over_s3() {
    let server = S3Server::start(&["imgs"]);
    let dir = server.root.path().join("imgs/set");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..3 {
        std::fs::write(dir.join(format!("{i}.png")), png(4, 4, i)).unwrap();
    }
    let loc =
        SourceLocation::open("s3://imgs/set/", &storage(&server, &server.secret_key)).unwrap();
    let shards = list_shards(&loc, ShardFormat::Folder, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(shards.len(), 1);
    let recs: Vec<RawRecord> = read_shard(&loc, &shards[0], &ReaderOptions::default())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(
        recs[2].payload.as_ref().unwrap().as_ref(),
        png(4, 4, 2).as_slice()
    );
}

#[tokio::test]
async fn wrong_secret_is_access_denied_and_never_printed() {
    let server = S3Server::start(&["imgs"]);
    let loc = SourceLocation::open("s3://imgs/", &storage(&server, "wrong-secret-value")).unwrap();
    let err = list_shards(&loc, ShardFormat::Folder, &ListOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, DatasetError::AccessDenied { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("s3://imgs"), "{shown}");
    assert!(!shown.contains("wrong-secret-value"), "{shown}");
    assert!(!shown.contains(&server.secret_key), "{shown}");
}
