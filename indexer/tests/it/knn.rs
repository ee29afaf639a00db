//! Nearest neighbours on real Lance tables: precompute-knn recall against exact brute force,
//! exclusions, resume, two workers, version pinning, build-index and the retriever, and the
//! errors a user can hit.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt64Type};
use arrow_array::Array;
use futures::TryStreamExt;
use knn_datasets::StorageConfig;
use knn_indexer::knn::search::{exact_knn, Exclusion};
use knn_indexer::knn::synthetic::{
    clustered, vector_batch, vector_schema, write_vectors, Clustered,
};
use knn_indexer::knn::{
    build_index, precompute_knn, IndexConfig, IndexKind, KnnConfig, KnnProgress, KnnSummary,
    RangeFilter, Retriever, RetrieverOptions,
};
use knn_indexer::IndexerError;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

/// Rows of an output: id → (neighbour ids, sims), nulls as `None`.
type KnnRows = BTreeMap<u64, (Vec<Option<u64>>, Vec<Option<f32>>)>;

fn cfg(table: &str, output: &str, extra: &str) -> KnnConfig {
    toml::from_str(&format!(
        "table = \"{table}\"\noutput = \"{output}\"\n{extra}\n[compute]\ndevice = \"cpu\"\n"
    ))
    .unwrap()
}

fn with_compute(mut c: KnnConfig, shards: usize, max_shards: usize) -> KnnConfig {
    c.compute.shards = shards;
    c.compute.max_shards = max_shards;
    c
}

async fn run(c: &KnnConfig, worker: (usize, usize)) -> Result<KnnSummary, IndexerError> {
    precompute_knn(
        c,
        &StorageConfig::default(),
        worker,
        Arc::new(KnnProgress::default()),
    )
    .await
}

/// Every row of the table at `uri`, all columns.
async fn scan_all(uri: &str) -> Vec<arrow_array::RecordBatch> {
    let ds = lance::Dataset::open(uri).await.unwrap();
    ds.scan()
        .try_into_stream()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn read_rows(uri: &str) -> KnnRows {
    let batches = scan_all(uri).await;
    let mut out = BTreeMap::new();
    for b in batches {
        let ids = b
            .column_by_name("id")
            .unwrap()
            .as_primitive::<UInt64Type>()
            .clone();
        let knn = b
            .column_by_name("knn_ids")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        let sims = b
            .column_by_name("knn_sims")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        for i in 0..b.num_rows() {
            let n = knn.value(i);
            let s = sims.value(i);
            let prev = out.insert(
                ids.value(i),
                (
                    n.as_primitive::<UInt64Type>().iter().collect(),
                    s.as_primitive::<Float32Type>().iter().collect(),
                ),
            );
            assert!(prev.is_none(), "id {} written twice", ids.value(i));
        }
    }
    out
}

/// Every row and neighbour of the kNN output `uri` is at the row address it records in
/// `source` (the embeddings version it was made from).
async fn assert_rows_at_their_addresses(uri: &str, source: &Arc<lance::Dataset>) {
    let batches = scan_all(uri).await;
    let (mut addrs, mut want) = (Vec::new(), Vec::new());
    for b in &batches {
        let u64s = |c: &str| {
            let col = b.column_by_name(c).unwrap();
            match col.as_fixed_size_list_opt() {
                Some(l) => l.values().as_primitive::<UInt64Type>().clone(),
                None => col.as_primitive::<UInt64Type>().clone(),
            }
        };
        let (nbr, nbr_addr) = (u64s("knn_ids"), u64s("knn_row_addrs"));
        addrs.extend(u64s("row_addr").values());
        want.extend(u64s("id").values());
        for j in 0..nbr.len() {
            assert_eq!(nbr.is_null(j), nbr_addr.is_null(j));
            if !nbr.is_null(j) {
                addrs.push(nbr_addr.value(j));
                want.push(nbr.value(j));
            }
        }
    }
    let projection = source.schema().project(&["id"]).unwrap();
    let plan = lance::dataset::ProjectionRequest::from(projection)
        .into_projection_plan(source.clone())
        .unwrap();
    let got =
        lance::dataset::TakeBuilder::try_new_from_addresses(source.clone(), addrs, Arc::new(plan))
            .unwrap()
            .execute()
            .await
            .unwrap();
    assert_eq!(
        got.column(0).as_primitive::<UInt64Type>().values(),
        &want[..]
    );
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().to_string()
}

async fn table_of(dir: &Path, name: &str, data: &Clustered) -> String {
    let uri = path(dir, name);
    write_vectors(&uri, &data.ids, &data.emb, false)
        .await
        .unwrap();
    uri
}

fn exact(data: &Clustered, k: i64, exclusion: Exclusion) -> HashMap<u64, Vec<u64>> {
    let ids = Tensor::from_slice(&data.ids.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let top = exact_knn(&data.emb, &ids, &data.emb, &ids, k, exclusion);
    let got: Vec<i64> = Vec::try_from(&top.ids.contiguous().view([-1])).unwrap();
    data.ids
        .iter()
        .zip(got.chunks(k as usize))
        .map(|(&id, c)| (id, c.iter().map(|&x| x as u64).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_settings_reach_recall_99_and_never_return_the_row_itself() {
    let dir = tempfile::tempdir().unwrap();
    // 20 000 rows: above the exact-search threshold, so the IVF plan is used.
    let data = clustered(20_000, 32, 200, 1.0, 5);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let out = path(dir.path(), "knn.lance");
    let c = cfg(&table, &out, "");
    let s = run(&c, (0, 1)).await.unwrap();
    let meta = s.meta.clone().unwrap();
    assert!(
        meta.partitions > 1 && meta.nprobe < meta.partitions,
        "{meta:?}"
    );
    assert_eq!(s.queries, 20_000);
    assert_eq!(s.short_rows, 0);

    let rows = read_rows(&out).await;
    assert_eq!(rows.len(), 20_000);
    let truth = exact(&data, 10, Exclusion::default());
    let (mut hit, mut all) = (0, 0);
    for (id, (knn, sims)) in &rows {
        assert!(!knn.contains(&Some(*id)), "row {id} is its own neighbour");
        assert!(
            sims.windows(2).all(|w| w[0] >= w[1]),
            "sims not sorted for {id}"
        );
        let want: HashSet<_> = truth[id].iter().collect();
        hit += knn.iter().flatten().filter(|x| want.contains(x)).count();
        all += 10;
    }
    let recall = hit as f64 / all as f64;
    eprintln!("recall@10 {recall}, plan {meta:?}");
    assert!(recall >= 0.99, "recall@10 {recall}");
    // The calibration's estimate is close to what the run achieved.
    let estimated = meta.calibration.unwrap().recall;
    assert!(
        (estimated - recall).abs() < 0.02,
        "estimated {estimated}, got {recall}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_streamed_and_two_level_searches_agree() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(20_000, 32, 200, 1.0, 5);
    let table = table_of(dir.path(), "v.lance", &data).await;
    // In memory (the default budget holds 20 000 rows) against one pass over the table per
    // query block (a budget of 0 holds nothing), in blocks of 5 000 queries.
    let held = path(dir.path(), "held.lance");
    let mut c = with_compute(cfg(&table, &held, ""), 4, 0);
    c.compute.query_block_rows = 5000;
    let s = run(&c, (0, 1)).await.unwrap();
    assert!(s.resident_mib.is_some(), "{s}");
    assert!(s.to_string().contains("table held in memory"), "{s}");
    let streamed = path(dir.path(), "streamed.lance");
    let mut c = with_compute(cfg(&table, &streamed, ""), 4, 0);
    c.compute.query_block_rows = 5000;
    c.compute.memory_mib = 0;
    let s = run(&c, (0, 1)).await.unwrap();
    assert!(s.resident_mib.is_none(), "{s}");
    assert!(s.to_string().contains("one pass over the table"), "{s}");
    let (a, b) = (read_rows(&held).await, read_rows(&streamed).await);
    assert_eq!(a.len(), 20_000);
    let same = a.iter().filter(|(id, r)| b[id].0 == r.0).count();
    assert!(
        same >= 19_980,
        "{same} of 20000 rows have the same neighbours"
    );

    // Two-level: 10 cells. A first run stops after one shard; the rerun reads the stored
    // plan (cells included) and finishes; recall holds.
    let cells = path(dir.path(), "cells.lance");
    let c = with_compute(cfg(&table, &cells, "[ivf]\ncells = 10"), 4, 1);
    let first = run(&c, (0, 1)).await.unwrap();
    let meta = first.meta.clone().unwrap();
    let cell_probe = meta.calibration.as_ref().unwrap().cell_probe;
    assert!(matches!(cell_probe, Some(1..=10)), "{meta:?}");
    assert_eq!(first.shards_committed, 1);
    let rest = run(&with_compute(c.clone(), 4, 0), (0, 1)).await.unwrap();
    assert_eq!(rest.shards_committed, 3);
    assert_eq!(rest.meta.unwrap().plan_sha, meta.plan_sha);
    let truth = exact(&data, 10, Exclusion::default());
    let rows = read_rows(&cells).await;
    let hit: usize = rows
        .iter()
        .map(|(id, (knn, _))| {
            let want: HashSet<_> = truth[id].iter().collect();
            knn.iter().flatten().filter(|x| want.contains(x)).count()
        })
        .sum();
    let recall = hit as f64 / (10 * rows.len()) as f64;
    assert!(recall >= 0.99, "two-level recall@10 {recall}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_tables_are_searched_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(1500, 16, 30, 1.0, 6);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let out = path(dir.path(), "knn.lance");
    let s = run(&cfg(&table, &out, "k = 5"), (0, 1)).await.unwrap();
    assert_eq!(s.meta.unwrap().partitions, 1);
    let truth = exact(&data, 5, Exclusion::default());
    for (id, (knn, _)) in read_rows(&out).await {
        let got: Vec<u64> = knn.into_iter().flatten().collect();
        assert_eq!(got, truth[&id], "row {id}");
    }
    // A configured nprobe above the partitions probes them all: exact as well.
    let all = path(dir.path(), "all.lance");
    let c = cfg(&table, &all, "k = 5\n[ivf]\npartitions = 4\nnprobe = 50");
    let s = run(&c, (0, 1)).await.unwrap();
    let meta = s.meta.unwrap();
    assert_eq!((meta.partitions, meta.nprobe), (4, 4));
    for (id, (knn, _)) in read_rows(&all).await {
        let got: Vec<u64> = knn.into_iter().flatten().collect();
        assert_eq!(got, truth[&id], "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_duplicates_are_excluded_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let base = clustered(600, 16, 20, 1.0, 7);
    // Rows 600..700 copy rows 0..100 under new ids (the same web image twice).
    let dup_ids: Vec<u64> = (0..100).map(|i| u64::MAX / 2 + 1000 + i).collect();
    let emb = Tensor::cat(&[base.emb.shallow_clone(), base.emb.narrow(0, 0, 100)], 0);
    let ids: Vec<u64> = base
        .ids
        .iter()
        .copied()
        .chain(dup_ids.iter().copied())
        .collect();
    let table = path(dir.path(), "v.lance");
    write_vectors(&table, &ids, &emb, false).await.unwrap();
    let copy_of: HashMap<u64, u64> = (0..100).map(|i| (base.ids[i], dup_ids[i])).collect();

    let plain = path(dir.path(), "plain.lance");
    run(&cfg(&table, &plain, ""), (0, 1)).await.unwrap();
    let rows = read_rows(&plain).await;
    for (orig, copy) in &copy_of {
        assert_eq!(
            rows[orig].0[0],
            Some(*copy),
            "without the threshold the copy is nearest"
        );
    }

    let dedup = path(dir.path(), "dedup.lance");
    run(&cfg(&table, &dedup, "duplicate_similarity = 0.999"), (0, 1))
        .await
        .unwrap();
    let rows = read_rows(&dedup).await;
    for (orig, copy) in &copy_of {
        assert!(
            !rows[orig].0.contains(&Some(*copy)),
            "duplicate of {orig} kept"
        );
        assert!(
            !rows[copy].0.contains(&Some(*orig)),
            "duplicate of {copy} kept"
        );
    }
    for (_, (_, sims)) in rows {
        assert!(sims.iter().flatten().all(|&s| s < 0.999));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_resumes_to_the_same_output_and_never_commits_a_shard_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(3000, 16, 40, 1.0, 8);
    let table = table_of(dir.path(), "v.lance", &data).await;

    let straight = path(dir.path(), "straight.lance");
    run(&with_compute(cfg(&table, &straight, ""), 6, 0), (0, 1))
        .await
        .unwrap();

    let resumed = path(dir.path(), "resumed.lance");
    let first = run(&with_compute(cfg(&table, &resumed, ""), 6, 2), (0, 1))
        .await
        .unwrap();
    assert_eq!(first.shards_committed, 2);
    let partial = read_rows(&resumed).await;
    assert!(!partial.is_empty() && partial.len() < 3000);
    let second = run(&with_compute(cfg(&table, &resumed, ""), 6, 0), (0, 1))
        .await
        .unwrap();
    assert_eq!((second.shards_skipped, second.shards_committed), (2, 4));
    let third = run(&with_compute(cfg(&table, &resumed, ""), 6, 0), (0, 1))
        .await
        .unwrap();
    assert_eq!((third.shards_skipped, third.shards_committed), (6, 0));
    assert_eq!(read_rows(&resumed).await, read_rows(&straight).await);
    lance::Dataset::open(&resumed)
        .await
        .unwrap()
        .validate()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_shards_and_together_equal_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(2500, 16, 30, 1.0, 9);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let one = path(dir.path(), "one.lance");
    run(&with_compute(cfg(&table, &one, ""), 5, 0), (0, 1))
        .await
        .unwrap();

    let two = path(dir.path(), "two.lance");
    let c = with_compute(cfg(&table, &two, ""), 5, 0);
    let (a, b) = tokio::join!(run(&c, (0, 2)), run(&c, (1, 2)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.shards_assigned, b.shards_assigned), (3, 2));
    assert_eq!(a.shards_committed + b.shards_committed, 5);
    assert_eq!(a.queries + b.queries, 2500);
    // Id ranges split the ids present, so 63-bit hashed ids spread over all five shards.
    assert!(
        (1300..1700).contains(&a.queries) && (800..1200).contains(&b.queries),
        "{} + {}",
        a.queries,
        b.queries
    );
    assert_eq!(read_rows(&two).await, read_rows(&one).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_version_keeps_results_reproducible_while_the_table_grows() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(2000, 16, 30, 1.0, 10);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let first = path(dir.path(), "first.lance");
    let c = with_compute(cfg(&table, &first, ""), 4, 2);
    let partial = run(&c, (0, 1)).await.unwrap();
    let pinned = partial.meta.unwrap().source_version;

    // New rows arrive (near the old ones, so they would change many neighbour lists).
    let more = clustered(2000, 16, 30, 1.0, 10);
    let new_ids: Vec<u64> = (0..2000).map(|i| (1u64 << 62) + i).collect();
    let moved = &more.emb + Tensor::randn_like(&more.emb) * 0.01;
    write_vectors(&table, &new_ids, &moved, true).await.unwrap();

    // Resuming reads the pinned version: no new ids, same lists as a fresh run pinned there.
    let resumed = run(&with_compute(cfg(&table, &first, ""), 4, 0), (0, 1))
        .await
        .unwrap();
    assert_eq!(resumed.meta.unwrap().source_version, pinned);
    let rows = read_rows(&first).await;
    assert_eq!(rows.len(), 2000);
    let again = path(dir.path(), "again.lance");
    let c = cfg(&table, &again, &format!("source_version = {pinned}"));
    run(&with_compute(c, 4, 0), (0, 1)).await.unwrap();
    assert_eq!(read_rows(&again).await, rows);

    // The latest version does see the new rows.
    let latest = path(dir.path(), "latest.lance");
    run(&cfg(&table, &latest, ""), (0, 1)).await.unwrap();
    assert_eq!(read_rows(&latest).await.len(), 4000);

    // The output reads rows by address in the pinned version, and a tag keeps that version
    // (and the one `latest` was made from) through a clean-up that removes the untagged
    // old one between them.
    for batch in 0..2u64 {
        let more_ids: Vec<u64> = (0..10).map(|i| (1u64 << 61) + 10 * batch + i).collect();
        write_vectors(&table, &more_ids, &moved.narrow(0, 0, 10), true)
            .await
            .unwrap();
    }
    let upkeep = knn_datasets::TableMaintenance {
        keep_versions_hours: 0.0,
        ..Default::default()
    };
    let gc = knn_indexer::table::maintain::gc(&table, &Default::default(), &upkeep)
        .await
        .unwrap();
    assert!(gc.versions_removed >= 1, "{gc:?}");
    let tagged = lance::Dataset::open(&table).await.unwrap();
    let tag = knn_indexer::knn::precompute::source_tag(&first);
    assert_eq!(tagged.tags().get_version(&tag).await.unwrap(), pinned);
    let source = Arc::new(tagged.checkout_version(pinned).await.unwrap());
    assert_rows_at_their_addresses(&first, &source).await;

    // Asking an existing output for other settings is refused, naming them.
    let err = run(&cfg(&table, &first, "k = 5"), (0, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, IndexerError::SchemaMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("`knn.k` is 10 there, 5 here"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompute_errors_name_the_table_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(8, 4, 2, 1.0, 11);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let out = path(dir.path(), "knn.lance");
    let err = run(&cfg(&table, &out, "k = 8"), (0, 1)).await.unwrap_err();
    assert!(
        matches!(err, IndexerError::KTooLarge { k: 8, rows: 8, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&table) && err.to_string().contains("k <= 7"),
        "{err}"
    );

    let empty = path(dir.path(), "empty.lance");
    let reader = arrow_array::RecordBatchIterator::new(vec![], vector_schema(4, &[]));
    lance::Dataset::write(reader, &empty, None).await.unwrap();
    let err = run(&cfg(&empty, &out, ""), (0, 1)).await.unwrap_err();
    assert!(matches!(err, IndexerError::EmptyTable { .. }), "{err}");

    let missing = path(dir.path(), "nope.lance");
    let err = run(&cfg(&missing, &out, ""), (0, 1)).await.unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriever_searches_any_table_with_filters_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = clustered(500, 8, 10, 1.0, 12);
    let b = clustered(500, 8, 10, 1.0, 13);
    let table_a = table_of(dir.path(), "a.lance", &a).await;
    // Table b carries a score column for range filters.
    let table_b = path(dir.path(), "b.lance");
    let scores: Vec<f32> = (0..500).map(|i| (i % 10) as f32 / 10.0).collect();
    let batch = vector_batch(&b.ids, &b.emb, &[("score", scores.clone())]).unwrap();
    let reader = arrow_array::RecordBatchIterator::new(vec![Ok(batch.clone())], batch.schema());
    lance::Dataset::write(reader, &table_b, None).await.unwrap();

    let query: Vec<f32> = Vec::try_from(&a.emb.get(0)).unwrap();
    let ra = Retriever::open(&table_a, &StorageConfig::default())
        .await
        .unwrap();
    let rb = Retriever::open(&table_b, &StorageConfig::default())
        .await
        .unwrap();
    assert!(!ra.is_indexed());
    let na = ra.search(&query, 5).await.unwrap();
    let nb = rb.search(&query, 5).await.unwrap();
    assert_eq!(na.ids[0], a.ids[0], "a row is its own nearest neighbour");
    assert!((na.sims[0] - 1.0).abs() < 1e-4);
    assert_eq!(na.emb.len(), 5 * 8);
    assert!(na.ids.iter().all(|i| !b.ids.contains(i)));
    assert!(nb.ids.iter().all(|i| b.ids.contains(i)));
    assert_ne!(na.ids, nb.ids, "two databases give different neighbours");

    // Results match exact search, and their embeddings are the rows'.
    let truth = exact(&a, 5, Exclusion::default());
    assert_eq!(&na.ids[1..], &truth[&a.ids[0]][..4]);
    let row = a.ids.iter().position(|&i| i == na.ids[1]).unwrap();
    let want: Vec<f32> = Vec::try_from(&a.emb.get(row as i64)).unwrap();
    assert!(na.emb[8..16]
        .iter()
        .zip(&want)
        .all(|(x, y)| (x - y).abs() < 1e-5));

    // Range filter: every result in [0.3, 0.5).
    let f = RangeFilter {
        column: "score".into(),
        low: 0.3,
        high: 0.5,
    };
    let got = rb.search_filtered(&query, 7, Some(&f)).await.unwrap();
    assert_eq!(got.ids.len(), 7);
    for id in &got.ids {
        let row = b.ids.iter().position(|x| x == id).unwrap();
        assert!((0.3..0.5).contains(&scores[row]), "score {}", scores[row]);
    }

    // Excluded ids (eval's held-out rows) never come back; the rest is the exact order.
    let without = ra.clone().excluding(na.ids[..2].iter().copied());
    let got = without.search(&query, 5).await.unwrap();
    assert_eq!(got.ids.len(), 5);
    assert!(
        got.ids.iter().all(|i| !na.ids[..2].contains(i)),
        "{:?}",
        got.ids
    );
    let deeper = exact(&a, 7, Exclusion::default());
    assert_eq!(&got.ids[..], &deeper[&a.ids[0]][1..6]);
    let first7 = rb.search_filtered(&query, 7, Some(&f)).await.unwrap().ids;
    let next = rb.clone().excluding(first7.clone());
    let after = next.search_filtered(&query, 7, Some(&f)).await.unwrap();
    assert_eq!(after.ids.len(), 7);
    assert!(
        after.ids.iter().all(|i| !first7.contains(i)),
        "{:?}",
        after.ids
    );
    for id in &after.ids {
        let row = b.ids.iter().position(|x| x == id).unwrap();
        assert!(
            (0.3..0.5).contains(&scores[row]),
            "filter and exclusion together"
        );
    }
    let err = ra
        .clone()
        .excluding(a.ids[..497].iter().copied())
        .search(&query, 4)
        .await
        .unwrap_err();
    assert!(
        matches!(err, IndexerError::KTooLarge { k: 4, excluding, .. } if excluding.contains("excluded")),
        "{err}"
    );

    assert_retriever_errors(dir.path(), &ra, &rb, &table_a, &query).await;
}

/// A query of the wrong width, too large a k, a missing filter column, no index when one is
/// required, and an empty table: each its own error naming what to fix.
async fn assert_retriever_errors(
    dir: &Path,
    ra: &Retriever,
    rb: &Retriever,
    table_a: &str,
    query: &[f32],
) {
    let err = ra.search(&query[..4], 5).await.unwrap_err();
    assert!(
        matches!(
            err,
            IndexerError::DimensionMismatch {
                query_dim: 4,
                table_dim: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(table_a));
    let err = ra.search(query, 501).await.unwrap_err();
    assert!(
        matches!(
            err,
            IndexerError::KTooLarge {
                k: 501,
                rows: 500,
                ..
            }
        ),
        "{err}"
    );
    let bad = RangeFilter {
        column: "nope".into(),
        low: 0.0,
        high: 1.0,
    };
    let err = rb.search_filtered(query, 3, Some(&bad)).await.unwrap_err();
    assert!(matches!(err, IndexerError::MissingColumn { .. }), "{err}");
    let strict = RetrieverOptions {
        require_index: true,
        ..Default::default()
    };
    let err = Retriever::open_with(table_a, &StorageConfig::default(), None, strict)
        .await
        .unwrap_err();
    assert!(matches!(err, IndexerError::NoIndex { .. }), "{err}");
    assert!(err.to_string().contains("build-index"), "{err}");
    let empty = path(dir, "empty.lance");
    let reader = arrow_array::RecordBatchIterator::new(vec![], vector_schema(8, &[]));
    lance::Dataset::write(reader, &empty, None).await.unwrap();
    let err = Retriever::open(&empty, &StorageConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, IndexerError::EmptyTable { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_index_makes_the_retriever_use_an_ann_index() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(3000, 32, 30, 1.0, 14);
    let table = table_of(dir.path(), "v.lance", &data).await;
    let truth = exact(&data, 10, Exclusion::default());
    for kind in [IndexKind::IvfPq, IndexKind::IvfHnswSq] {
        let cfg = IndexConfig {
            table: Some(table.clone()),
            kind,
            ..Default::default()
        };
        let s = build_index(&cfg, &StorageConfig::default()).await.unwrap();
        assert_eq!((s.rows, s.dim, s.partitions), (3000, 32, 55));
        let strict = RetrieverOptions {
            require_index: true,
            ..Default::default()
        };
        let r = Retriever::open_with(&table, &StorageConfig::default(), None, strict)
            .await
            .unwrap();
        assert!(r.is_indexed());
        let (mut hit, mut all) = (0, 0);
        for i in (0..3000).step_by(30) {
            let q: Vec<f32> = Vec::try_from(&data.emb.get(i)).unwrap();
            let got = r.search(&q, 11).await.unwrap();
            let want: HashSet<_> = truth[&data.ids[i as usize]].iter().collect();
            hit += got.ids.iter().filter(|x| want.contains(x)).count();
            all += 10;
        }
        let recall = hit as f64 / all as f64;
        assert!(recall >= 0.9, "{kind:?} recall@10 {recall}");
    }

    let tiny = table_of(dir.path(), "tiny.lance", &clustered(100, 8, 4, 1.0, 15)).await;
    let cfg = IndexConfig {
        table: Some(tiny.clone()),
        ..Default::default()
    };
    let err = build_index(&cfg, &StorageConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IndexerError::Config { key, reason }
            if key == "index.kind" && reason.contains("100 rows") && reason.contains("256")),
        "{err}"
    );
}

/// Score buckets (PAPER.md §4.2): `i/n` ranks the pool of nearest rows by score, cuts it into
/// n equal buckets and returns the nearest of bucket i — checked against brute force; a
/// table without the column and a bad spec are named errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_buckets_take_the_nearest_of_one_quantile_of_the_pool() {
    use knn_indexer::knn::ScoreBucket;
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(400, 8, 5, 1.0, 21);
    let table = path(dir.path(), "scored.lance");
    // Distinct scores, unrelated to the position in the table.
    let scores: Vec<f32> = (0..400).map(|i| ((i * 37) % 400) as f32 / 4.0).collect();
    let batch = vector_batch(&data.ids, &data.emb, &[("score", scores.clone())]).unwrap();
    let reader = arrow_array::RecordBatchIterator::new(vec![Ok(batch.clone())], batch.schema());
    lance::Dataset::write(reader, &table, None).await.unwrap();
    let r = Retriever::open(&table, &StorageConfig::default())
        .await
        .unwrap();

    let query: Vec<f32> = Vec::try_from(&data.emb.get(3)).unwrap();
    let q = Tensor::from_slice(&query);
    let unit = &data.emb / data.emb.norm_scalaropt_dim(2.0, [1], true);
    let sims: Vec<f32> = Vec::try_from(unit.matmul(&(&q / q.norm()))).unwrap();
    let mut by_sim: Vec<usize> = (0..400).collect();
    by_sim.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
    let pool = &by_sim[..100];
    for (bucket, k) in [(1, 7), (5, 7), (3, 30)] {
        let spec = ScoreBucket::parse("score", &format!("{bucket}/5"), 100, "--bucket").unwrap();
        let got = r.search_bucket(&query, k, &spec).await.unwrap();
        let mut ranked = pool.to_vec();
        ranked.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut want: Vec<usize> = ranked[(bucket - 1) * 20..bucket * 20].to_vec();
        want.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        want.truncate(k);
        let want: Vec<u64> = want.iter().map(|&i| data.ids[i]).collect();
        assert_eq!(got.ids, want, "bucket {bucket}/5, k {k}");
        assert_eq!(got.emb.len(), want.len() * 8);
    }
    // Higher buckets hold higher scores.
    let mut means = Vec::new();
    for b in 1..=5 {
        let spec = ScoreBucket::parse("score", &format!("{b}/5"), 100, "--bucket").unwrap();
        let got = r.search_bucket(&query, 10, &spec).await.unwrap();
        let sum: f32 = got
            .ids
            .iter()
            .map(|id| scores[data.ids.iter().position(|x| x == id).unwrap()])
            .sum();
        means.push(sum / 10.0);
    }
    assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");

    let missing = ScoreBucket::parse("aesthetic", "1/5", 100, "--bucket").unwrap();
    let err = r.search_bucket(&query, 5, &missing).await.unwrap_err();
    assert!(
        matches!(&err, IndexerError::MissingColumn { column, detail, .. }
            if column == "aesthetic" && detail.contains("knn-diffusion score")),
        "{err}"
    );
    for bad in ["0/5", "6/5", "five", "2/0"] {
        let err = ScoreBucket::parse("score", bad, 100, "--bucket").unwrap_err();
        assert!(
            matches!(&err, IndexerError::Config { key, .. } if key == "--bucket"),
            "{bad}: {err}"
        );
    }
}
