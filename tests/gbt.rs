//! Gradient-boosted tree scoring against XGBoost itself (docs/model.md): models trained and
//! saved by the real xgboost Python package, their predictions computed by xgboost, then
//! the same files loaded by `clickgate_core::gbt` and every prediction compared. Also real
//! and damaged model files that must be refused with an error naming the problem.
//!
//! Needs `CLICKGATE_TEST_XGBOOST`: a Python with xgboost and numpy (scripts/services.sh
//! installs one). The test fails when it is missing, never skips.

mod common;

use std::path::Path;
use std::process::Command;

use clickgate_core::gbt::GbtModel;
use serde_json::{json, Value};

/// Trains the models and writes, into the directory given as argv[1]:
///   <name>.json         the model, Booster.save_model
///   <name>.x            the test rows: one row per line, f32 bit patterns (hex)
///   <name>.pred / .margin  xgboost's predict / predict(output_margin=True), f32 bits (hex)
///   multi.json          a multi:softprob model (to be refused)
const TRAIN: &str = r#"
import json, sys
import numpy as np
import xgboost as xgb

out = sys.argv[1]
rng = np.random.default_rng(20240601)
n, nf = 4000, 10
X = rng.normal(size=(n, nf)).astype(np.float32)
X[:, 3] = rng.integers(0, 5, size=n).astype(np.float32)    # few distinct values: ties
X[:, 7] *= 1000.0                                           # a wide range
for f in (1, 4, 8):                                         # missing values
    X[rng.random(n) < 0.15, f] = np.nan
logit = 1.5 * X[:, 0] - np.nan_to_num(X[:, 1]) + 0.5 * X[:, 3] - 0.002 * X[:, 7] \
    + np.where(np.isnan(X[:, 4]), 1.0, 0.0) + rng.normal(scale=0.5, size=n)
y_bin = (logit > 0).astype(np.float32)
y_reg = (3.0 + logit + rng.normal(scale=0.3, size=n)).astype(np.float32)
train, test = slice(0, 3000), slice(3000, n)

def hexrows(a):
    a = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    return "\n".join(" ".join("%08x" % v for v in row) for row in a) + "\n"

def thresholds(path):
    m = json.load(open(path))
    pairs = []
    for t in m["learner"]["gradient_booster"]["model"]["trees"]:
        for i, l in enumerate(t["left_children"]):
            if l != -1:
                pairs.append((t["split_indices"][i], t["split_conditions"][i]))
    return pairs

def run(name, params, y, rounds):
    b = xgb.train(params, xgb.DMatrix(X[train], label=y[train]), rounds)
    path = "%s/%s.json" % (out, name)
    b.save_model(path)
    Xt = X[test].copy()
    # rows whose features sit exactly on split thresholds (the strict `<` matters)
    for k, (f, c) in enumerate(thresholds(path)[:200]):
        Xt[k % Xt.shape[0], f] = np.float32(c)
    # extreme values (xgboost refuses infinities in its input)
    Xt[-1, :] = np.float32(3e38); Xt[-2, :] = np.float32(-3e38); Xt[-3, :] = np.nan
    d = xgb.DMatrix(Xt)
    open("%s/%s.x" % (out, name), "w").write(hexrows(Xt))
    open("%s/%s.pred" % (out, name), "w").write(hexrows(b.predict(d)))
    open("%s/%s.margin" % (out, name), "w").write(hexrows(b.predict(d, output_margin=True)))

run("binary", {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "seed": 1}, y_bin, 50)
run("reglog", {"objective": "reg:logistic", "max_depth": 3, "eta": 0.2, "seed": 2,
               "tree_method": "exact"}, y_bin, 40)
run("regression", {"objective": "reg:squarederror", "max_depth": 5, "eta": 0.1, "seed": 3}, y_reg, 60)
run("deep", {"objective": "binary:logistic", "max_depth": 0, "max_leaves": 64,
             "grow_policy": "lossguide", "eta": 0.3, "seed": 4, "base_score": 0.3}, y_bin, 20)
m = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 2},
              xgb.DMatrix(X[train], label=(y_reg[train] > 3).astype(int) + (y_reg[train] > 5)), 3)
m.save_model("%s/multi.json" % out)
print(xgb.__version__)
"#;

/// Train once per test process; the directory lives as long as the process.
fn models() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(common::xgboost_python())
            .arg("-c")
            .arg(TRAIN)
            .arg(dir.path())
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "training failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("xgboost {}", String::from_utf8_lossy(&out.stdout).trim());
        dir
    })
    .path()
}

fn read_rows(path: &Path) -> Vec<Vec<f32>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
                .collect()
        })
        .collect()
}

fn read_model(name: &str) -> String {
    std::fs::read_to_string(models().join(format!("{name}.json"))).unwrap()
}

/// Every prediction and margin equals xgboost's within 1e-6; returns how many were exact.
fn compare(name: &str, objective: &str) {
    let dir = models();
    let model = GbtModel::from_json(&read_model(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(model.objective(), objective);
    assert_eq!(model.num_feature(), 10);
    let x = read_rows(&dir.join(format!("{name}.x")));
    let pred = read_rows(&dir.join(format!("{name}.pred")));
    let margin = read_rows(&dir.join(format!("{name}.margin")));
    assert_eq!(x.len(), 1000);
    assert_eq!(pred.len(), x.len());
    let (mut exact_p, mut exact_m, mut worst) = (0, 0, 0f32);
    for (i, row) in x.iter().enumerate() {
        let (p, m) = (model.predict(row), model.margin(row));
        let (want_p, want_m) = (pred[i][0], margin[i][0]);
        let dp = (p - want_p).abs();
        let dm = (m - want_m).abs();
        assert!(
            dp <= 1e-6,
            "{name} row {i}: prediction {p} vs xgboost {want_p} (features {row:?})"
        );
        assert!(
            dm <= 1e-6,
            "{name} row {i}: margin {m} vs xgboost {want_m} (features {row:?})"
        );
        worst = worst.max(dp).max(dm);
        exact_p += usize::from(p.to_bits() == want_p.to_bits());
        exact_m += usize::from(m.to_bits() == want_m.to_bits());
    }
    eprintln!(
        "{name}: {} trees, {} rows: {exact_m} margins and {exact_p} predictions bit-exact, \
         largest difference {worst:e}",
        model.num_trees(),
        x.len()
    );
    // The margin is summed exactly as xgboost sums it.
    assert_eq!(exact_m, x.len(), "{name}: margins not bit-exact");
}

#[test]
fn binary_logistic_matches_xgboost() {
    compare("binary", "binary:logistic");
}

#[test]
fn reg_logistic_matches_xgboost() {
    compare("reglog", "reg:logistic");
}

#[test]
fn squarederror_matches_xgboost() {
    compare("regression", "reg:squarederror");
}

#[test]
fn lossguide_deep_trees_and_explicit_base_score_match_xgboost() {
    compare("deep", "binary:logistic");
}

fn refused(text: &str) -> String {
    match GbtModel::from_json(text) {
        Ok(_) => panic!("a bad model file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn mutated(f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&read_model("binary")).unwrap();
    f(&mut v);
    v.to_string()
}

fn tree(v: &mut Value, t: usize) -> &mut Value {
    &mut v["learner"]["gradient_booster"]["model"]["trees"][t]
}

/// The first split node of tree `t` and its left child.
fn first_split(v: &Value, t: usize) -> (usize, i64) {
    let l = v["learner"]["gradient_booster"]["model"]["trees"][t]["left_children"]
        .as_array()
        .unwrap();
    (0, l[0].as_i64().unwrap())
}

#[test]
fn bad_model_files_are_refused_naming_the_problem() {
    let text = read_model("binary");
    let e = refused(&text[..text.len() * 2 / 3]);
    assert!(e.contains("not a valid XGBoost JSON model"), "{e}");

    let e = refused(&read_model("multi"));
    assert!(e.contains("multi:softprob"), "real multi-class file: {e}");
    let e = refused(&mutated(|v| {
        v["learner"]["objective"]["name"] = json!("multi:softprob")
    }));
    assert!(e.contains("unsupported objective `multi:softprob`"), "{e}");
    let e = refused(&mutated(|v| {
        v["learner"]["objective"]["name"] = json!("rank:pairwise")
    }));
    assert!(e.contains("unsupported objective `rank:pairwise`"), "{e}");

    let e = refused(&mutated(|v| tree(v, 7)["split_indices"][0] = json!(10)));
    assert!(
        e.contains("tree 7, node 0: split feature 10 is out of range (num_feature is 10)"),
        "{e}"
    );
    let e = refused(&mutated(|v| {
        v["learner"]["learner_model_param"]["num_feature"] = json!("4")
    }));
    assert!(e.contains("out of range (num_feature is 4)"), "{e}");

    let e = refused(&mutated(|v| {
        tree(v, 3)["right_children"][0] = json!(100_000)
    }));
    assert!(
        e.contains("tree 3, node 0: right child 100000 is out of range"),
        "{e}"
    );
    let e = refused(&mutated(|v| tree(v, 3)["left_children"][0] = json!(-5)));
    assert!(
        e.contains("tree 3, node 0: left child -5 is out of range"),
        "{e}"
    );

    // a cycle: the left child of the root's left child points back at the root
    let e = refused(&mutated(|v| {
        let (_, l) = first_split(v, 2);
        tree(v, 2)["left_children"][l as usize] = json!(0);
    }));
    assert!(
        e.contains("tree 2, node ") && e.contains("left child 0 is reached twice"),
        "{e}"
    );

    let e = refused(&mutated(|v| v["version"] = json!([9, 0, 0])));
    assert!(e.contains("XGBoost 9.0.0"), "{e}");
    let e = refused(&mutated(|v| {
        v["learner"]["gradient_booster"]["name"] = json!("dart")
    }));
    assert!(e.contains("unsupported booster `dart`"), "{e}");
}
