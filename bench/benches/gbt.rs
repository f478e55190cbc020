//! Gradient-boosted tree scoring (docs/model.md): `GbtModel::predict` per click on a
//! 200-tree, depth-6 model with 20 features, the size the billing job's model budget is
//! set for (≤ 2 µs per click per core).
//!
//! Run: `cargo bench -p clickgate-bench --bench gbt`.
//!
//! The model is synthetic but goes through the shipped loader: complete depth-6 trees with
//! random features, thresholds and missing-value directions are written as XGBoost JSON
//! text and loaded with `GbtModel::from_json`. Clicks are random feature vectors with
//! 1 in 10 values missing (NaN). The figure is ns per click.

use std::fmt::Write as _;
use std::hint::black_box;

use clickgate_core::gbt::GbtModel;
use clickgate_core::hash::mix64;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const TREES: usize = 200;
const DEPTH: u32 = 6;
const FEATURES: u64 = 20;
const CLICKS: usize = 4096;

/// A uniform value in [-1, 1) from a hash.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let mut s = String::from("[");
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        write!(s, "{x}").unwrap();
    }
    s.push(']');
    s
}

/// One complete tree, numbered as XGBoost numbers a depth-wise tree: breadth-first,
/// children of node i at 2i+1 and 2i+2.
fn tree_json(t: u64) -> String {
    let n = (1usize << (DEPTH + 1)) - 1;
    let splits = (1usize << DEPTH) - 1;
    let (mut left, mut right, mut feat, mut cond, mut dl) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let h = mix64(t << 32 | i as u64);
        if i < splits {
            left.push(2 * i as i64 + 1);
            right.push(2 * i as i64 + 2);
            feat.push(h % FEATURES);
            cond.push(unit(mix64(h)) * 0.8);
            dl.push(h >> 63);
        } else {
            left.push(-1);
            right.push(-1);
            feat.push(0);
            cond.push(unit(h) * 0.1);
            dl.push(0);
        }
    }
    format!(
        r#"{{"left_children":{},"right_children":{},"split_indices":{},"split_conditions":{},"default_left":{},"base_weights":{},"tree_param":{{"num_nodes":"{n}","num_feature":"{FEATURES}","size_leaf_vector":"1"}}}}"#,
        list(&left),
        list(&right),
        list(&feat),
        list(&cond),
        list(&dl),
        list(&cond),
    )
}

fn model_json() -> String {
    let trees: Vec<String> = (0..TREES as u64).map(tree_json).collect();
    format!(
        r#"{{"version":[2,1,0],"learner":{{"objective":{{"name":"binary:logistic"}},"learner_model_param":{{"base_score":"5E-1","num_class":"0","num_feature":"{FEATURES}","num_target":"1"}},"gradient_booster":{{"name":"gbtree","model":{{"gbtree_model_param":{{"num_trees":"{TREES}","num_parallel_tree":"1"}},"tree_info":{},"trees":[{}]}}}}}}}}"#,
        list(&vec![0; TREES]),
        trees.join(",")
    )
}

fn bench(c: &mut Criterion) {
    let text = model_json();
    let model = GbtModel::from_json(&text).expect("synthetic model loads");
    assert_eq!(model.num_trees(), TREES);
    let clicks: Vec<Vec<f32>> = (0..CLICKS as u64)
        .map(|c| {
            (0..FEATURES)
                .map(|f| {
                    let h = mix64(1 << 60 | c << 8 | f);
                    if h.is_multiple_of(10) {
                        f32::NAN
                    } else {
                        unit(h)
                    }
                })
                .collect()
        })
        .collect();

    let mut g = c.benchmark_group("gbt");
    g.throughput(Throughput::Elements(CLICKS as u64));
    g.bench_function("predict_200_trees_depth_6_per_click", |b| {
        b.iter(|| {
            clicks
                .iter()
                .map(|x| model.predict(black_box(x)))
                .sum::<f32>()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("gbt_load");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(10);
    g.bench_function("from_json_200_trees_depth_6", |b| {
        b.iter(|| GbtModel::from_json(black_box(&text)).unwrap().num_nodes())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
