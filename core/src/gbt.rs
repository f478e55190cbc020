//! Gradient-boosted tree scoring: a model trained with XGBoost and saved in XGBoost's own
//! JSON model format (`Booster.save_model("model.json")`), loaded once and scored per click
//! in pure Rust with XGBoost's arithmetic (docs/model.md).
//!
//! Accepted: the `gbtree` booster with numerical splits and one output (no multi-class, no
//! multi-target, no categorical splits), objectives `binary:logistic` / `reg:logistic`
//! (sigmoid link) and `reg:squarederror` (identity), files written by XGBoost 1.x to 3.x.
//! Everything else is refused with a [`GbtError`] naming the field, tree and node.
//!
//! Scoring follows XGBoost exactly: features and thresholds are `f32`, a split goes left
//! when `x < threshold`, a missing value (`NaN`) follows the node's `default_left`, and the
//! margin is the base margin plus each tree's leaf value, summed in `f32` in tree order.
//!
//! Layout: every tree is re-laid breadth-first into one contiguous array of 16-byte nodes
//! whose two children are adjacent (`right == left + 1`). A leaf points at itself, so each
//! tree is walked branch-free for exactly its depth; eight trees are walked side by side so
//! their loads overlap. A prediction allocates nothing.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// Most trees a model may hold.
pub const MAX_TREES: usize = 10_000;
/// Most nodes all trees together may hold (as stored in the file, deleted ones included).
pub const MAX_NODES: usize = 1_000_000;
/// Most features a model may declare (`num_feature`).
pub const MAX_FEATURES: usize = 1 << 16;
/// Deepest tree accepted (root at depth 0); each tree is walked exactly its depth.
pub const MAX_DEPTH: u32 = 64;
/// Oldest and newest XGBoost major version whose JSON files are accepted.
pub const SUPPORTED_MAJOR: (u64, u64) = (1, 3);

/// Why a model file was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GbtError {
    /// The text is not JSON, or a field has the wrong shape (serde_json's message, with line
    /// and column).
    #[error("model file is not a valid XGBoost JSON model: {0}")]
    Json(String),
    /// A field the format requires is absent.
    #[error("model file: missing field `{0}`")]
    Missing(&'static str),
    /// A field is present but its value is wrong or unsupported.
    #[error("model file: field `{field}`: {problem}")]
    Field { field: String, problem: String },
    /// The file was written by an XGBoost version outside [`SUPPORTED_MAJOR`].
    #[error("model file written by XGBoost {0}: versions 1.x to 3.x are supported")]
    Version(String),
    /// The objective has no supported link function.
    #[error("unsupported objective `{0}`: binary:logistic, reg:logistic and reg:squarederror are supported")]
    Objective(String),
    /// A booster other than `gbtree`.
    #[error("unsupported booster `{0}`: only gbtree is supported")]
    Booster(String),
    /// A size bound is exceeded.
    #[error("model too large: {0}")]
    TooLarge(String),
    /// One tree is malformed.
    #[error("tree {tree}: {problem}")]
    Tree { tree: usize, problem: String },
    /// One node of one tree is malformed.
    #[error("tree {tree}, node {node}: {problem}")]
    Node {
        tree: usize,
        node: usize,
        problem: String,
    },
}

/// The output transformation applied to the margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `reg:squarederror`: the margin is the prediction.
    Identity,
    /// `binary:logistic`, `reg:logistic`: `1 / (1 + exp(-margin))`.
    Sigmoid,
}

impl Link {
    fn for_objective(name: &str) -> Option<Link> {
        match name {
            "binary:logistic" | "reg:logistic" => Some(Link::Sigmoid),
            "reg:squarederror" => Some(Link::Identity),
            _ => None,
        }
    }

    /// The link applied to a margin, as XGBoost computes it (`common::Sigmoid`, in `f32`).
    #[inline]
    pub fn apply(self, margin: f32) -> f32 {
        match self {
            Link::Identity => margin,
            Link::Sigmoid => {
                if margin.is_nan() {
                    return f32::NAN;
                }
                // XGBoost adds 1e-16 to the denominator; in f32 that addition is exact 0.
                1.0 / ((-margin).min(88.7).exp() + 1.0)
            }
        }
    }

    /// The inverse link applied to the file's `base_score` (XGBoost's `ProbToMargin`, `f32`).
    fn prob_to_margin(self, base_score: f32) -> Result<f32, GbtError> {
        match self {
            Link::Identity => Ok(base_score),
            Link::Sigmoid => {
                if base_score > 0.0 && base_score < 1.0 {
                    Ok(-(1.0f32 / base_score - 1.0).ln())
                } else {
                    Err(GbtError::Field {
                        field: "learner.learner_model_param.base_score".into(),
                        problem: format!(
                            "{base_score} is not a probability in (0, 1), as a logistic objective needs"
                        ),
                    })
                }
            }
        }
    }
}

/// One node, 16 bytes. A split goes to `left` or `left + 1`; a leaf has `left` = itself,
/// `split` = 0 and its value in `value`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
struct Node {
    /// Threshold of a split, value of a leaf.
    value: f32,
    /// Feature compared (0 for a leaf, so the walk reads a valid slot).
    feature: u32,
    /// Absolute index of the left child (of itself for a leaf).
    left: u32,
    /// Bit 0: missing goes left. Bit 1: the node is a split.
    flags: u32,
}

const DEFAULT_LEFT: u32 = 1;
const SPLIT: u32 = 2;

/// One tree's place in the node array.
#[derive(Debug, Clone, Copy)]
struct TreeRef {
    root: u32,
    depth: u32,
}

/// A loaded model, ready to score.
#[derive(Debug, Clone)]
pub struct GbtModel {
    nodes: Vec<Node>,
    trees: Vec<TreeRef>,
    /// Per group of [`LANES`] consecutive trees, the deepest one's depth.
    group_depth: Vec<u32>,
    num_feature: usize,
    base_margin: f32,
    link: Link,
    objective: String,
}

/// Trees walked side by side.
const LANES: usize = 8;

impl GbtModel {
    /// Load a model from XGBoost's JSON model format. The caller bounds the text's size.
    pub fn from_json(text: &str) -> Result<GbtModel, GbtError> {
        let file: File = serde_json::from_str(text).map_err(|e| GbtError::Json(e.to_string()))?;
        build(file)
    }

    /// Number of features a click's vector must hold (`num_feature`).
    pub fn num_feature(&self) -> usize {
        self.num_feature
    }

    /// Number of trees.
    pub fn num_trees(&self) -> usize {
        self.trees.len()
    }

    /// Number of reachable nodes kept.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The objective named in the file.
    pub fn objective(&self) -> &str {
        &self.objective
    }

    /// The link applied by [`GbtModel::predict`].
    pub fn link(&self) -> Link {
        self.link
    }

    /// The margin every prediction starts from (the file's `base_score` through the inverse
    /// link).
    pub fn base_margin(&self) -> f32 {
        self.base_margin
    }

    /// The prediction: the margin through the objective's link (a probability for the
    /// logistic objectives). `NaN` is a missing value. A vector shorter than
    /// [`GbtModel::num_feature`] has its absent trailing features missing; extra ones are
    /// ignored.
    #[inline]
    pub fn predict(&self, features: &[f32]) -> f32 {
        self.link.apply(self.margin(features))
    }

    /// The raw margin (XGBoost's `output_margin=True`).
    #[inline]
    pub fn margin(&self, features: &[f32]) -> f32 {
        if features.len() >= self.num_feature {
            // SAFETY: every node's `feature` is < `num_feature` (checked at load; a leaf's is
            // 0 and `num_feature` ≥ 1), and `features` holds at least `num_feature` values.
            self.margin_with(|f| unsafe { *features.get_unchecked(f as usize) })
        } else {
            self.margin_with(|f| features.get(f as usize).copied().unwrap_or(f32::NAN))
        }
    }

    #[inline(always)]
    fn margin_with(&self, x: impl Fn(u32) -> f32) -> f32 {
        let nodes = &self.nodes[..];
        // SAFETY: every index walked is a tree's root or a split's `left` / `left + 1`, or a
        // leaf's own index; `lay_out` only writes indices of nodes it has pushed.
        let node = |i: u32| unsafe { *nodes.get_unchecked(i as usize) };
        let step = |i: u32| -> u32 {
            let n = node(i);
            let v = x(n.feature);
            let go_left = (v < n.value) | (v.is_nan() & (n.flags & DEFAULT_LEFT != 0));
            n.left + ((!go_left) as u32 & (n.flags >> 1))
        };
        let mut sum = self.base_margin;
        let mut groups = self.trees.chunks_exact(LANES);
        for (g, &depth) in (&mut groups).zip(&self.group_depth) {
            let mut i: [u32; LANES] = std::array::from_fn(|k| g[k].root);
            for _ in 0..depth {
                for k in i.iter_mut() {
                    *k = step(*k);
                }
            }
            for &k in &i {
                sum += node(k).value;
            }
        }
        for t in groups.remainder() {
            let mut i = t.root;
            for _ in 0..t.depth {
                i = step(i);
            }
            sum += node(i).value;
        }
        sum
    }
}

// ---- the file, as serde reads it ---------------------------------------------------------

#[derive(Deserialize)]
struct File {
    learner: Option<Learner>,
    version: Option<Vec<u64>>,
}

#[derive(Deserialize)]
struct Learner {
    gradient_booster: Option<Booster>,
    learner_model_param: Option<Map<String, Value>>,
    objective: Option<Objective>,
}

#[derive(Deserialize)]
struct Objective {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Booster {
    name: Option<String>,
    model: Option<BoosterModel>,
}

#[derive(Deserialize)]
struct BoosterModel {
    trees: Option<Vec<Tree>>,
    tree_info: Option<Vec<i64>>,
    gbtree_model_param: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct Tree {
    left_children: Option<Vec<i64>>,
    right_children: Option<Vec<i64>>,
    split_indices: Option<Vec<i64>>,
    split_conditions: Option<Vec<f32>>,
    default_left: Option<Vec<Flag>>,
    split_type: Option<Vec<i64>>,
    tree_param: Option<Map<String, Value>>,
}

/// `default_left` is 0/1 in current files and true/false in some older ones.
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Flag, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("0, 1, true or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flag, E> {
                match v {
                    0 => Ok(Flag(false)),
                    1 => Ok(Flag(true)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flag, E> {
                match v {
                    0 => Ok(Flag(false)),
                    1 => Ok(Flag(true)),
                    _ => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

// ---- validation and layout ---------------------------------------------------------------

fn field_err(field: &str, problem: impl Into<String>) -> GbtError {
    GbtError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// A parameter XGBoost writes as a string ("10", "5E-1", "[5E-1]"); a plain number is taken
/// too.
fn param_str(map: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, GbtError> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(field_err(
            field,
            format!("expected a string, found {other}"),
        )),
    }
}

fn param_usize(
    map: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<usize>, GbtError> {
    match param_str(map, key, field)? {
        None => Ok(None),
        Some(s) => s
            .parse::<usize>()
            .map(Some)
            .map_err(|_| field_err(field, format!("`{s}` is not a non-negative integer"))),
    }
}

fn build(file: File) -> Result<GbtModel, GbtError> {
    let version = file.version.ok_or(GbtError::Missing("version"))?;
    let major = *version
        .first()
        .ok_or_else(|| field_err("version", "empty"))?;
    if major < SUPPORTED_MAJOR.0 || major > SUPPORTED_MAJOR.1 {
        let v: Vec<String> = version.iter().map(u64::to_string).collect();
        return Err(GbtError::Version(v.join(".")));
    }
    let learner = file.learner.ok_or(GbtError::Missing("learner"))?;

    let objective = learner
        .objective
        .ok_or(GbtError::Missing("learner.objective"))?
        .name
        .ok_or(GbtError::Missing("learner.objective.name"))?;
    let link =
        Link::for_objective(&objective).ok_or_else(|| GbtError::Objective(objective.clone()))?;

    let param = learner
        .learner_model_param
        .ok_or(GbtError::Missing("learner.learner_model_param"))?;
    const NF: &str = "learner.learner_model_param.num_feature";
    let num_feature = param_usize(&param, "num_feature", NF)?.ok_or(GbtError::Missing(NF))?;
    if num_feature == 0 {
        return Err(field_err(NF, "0: a model needs at least one feature"));
    }
    if num_feature > MAX_FEATURES {
        return Err(GbtError::TooLarge(format!(
            "num_feature {num_feature} is over the bound of {MAX_FEATURES}"
        )));
    }
    const NC: &str = "learner.learner_model_param.num_class";
    if let Some(n) = param_usize(&param, "num_class", NC)? {
        if n > 1 {
            return Err(field_err(
                NC,
                format!("{n}: multi-class models are not supported"),
            ));
        }
    }
    const NT: &str = "learner.learner_model_param.num_target";
    if let Some(n) = param_usize(&param, "num_target", NT)? {
        if n > 1 {
            return Err(field_err(
                NT,
                format!("{n}: multi-target models are not supported"),
            ));
        }
    }
    const BS: &str = "learner.learner_model_param.base_score";
    let base_text = param_str(&param, "base_score", BS)?.ok_or(GbtError::Missing(BS))?;
    // XGBoost 3 writes a vector, "[5E-1]"; one value is all a single-output model has.
    let inner = base_text
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(&base_text)
        .trim();
    if inner.contains(',') {
        return Err(field_err(
            BS,
            format!("`{base_text}`: more than one value (a multi-output model)"),
        ));
    }
    let base_score: f32 = inner
        .parse()
        .ok()
        .filter(|v: &f32| v.is_finite())
        .ok_or_else(|| field_err(BS, format!("`{base_text}` is not a finite number")))?;
    let base_margin = link.prob_to_margin(base_score)?;

    let booster = learner
        .gradient_booster
        .ok_or(GbtError::Missing("learner.gradient_booster"))?;
    let booster_name = booster
        .name
        .ok_or(GbtError::Missing("learner.gradient_booster.name"))?;
    if booster_name != "gbtree" {
        return Err(GbtError::Booster(booster_name));
    }
    let model = booster
        .model
        .ok_or(GbtError::Missing("learner.gradient_booster.model"))?;
    let trees = model
        .trees
        .ok_or(GbtError::Missing("learner.gradient_booster.model.trees"))?;
    if trees.len() > MAX_TREES {
        return Err(GbtError::TooLarge(format!(
            "{} trees, over the bound of {MAX_TREES}",
            trees.len()
        )));
    }
    const TI: &str = "learner.gradient_booster.model.tree_info";
    if let Some(info) = &model.tree_info {
        if info.len() != trees.len() {
            return Err(field_err(
                TI,
                format!("{} entries for {} trees", info.len(), trees.len()),
            ));
        }
        if let Some(t) = info.iter().position(|&c| c != 0) {
            return Err(field_err(
                TI,
                format!(
                    "tree {t} belongs to output group {}: multi-class models are not supported",
                    info[t]
                ),
            ));
        }
    }
    const GP: &str = "learner.gradient_booster.model.gbtree_model_param.num_trees";
    if let Some(p) = &model.gbtree_model_param {
        if let Some(n) = param_usize(p, "num_trees", GP)? {
            if n != trees.len() {
                return Err(field_err(
                    GP,
                    format!("says {n} trees, the file holds {}", trees.len()),
                ));
            }
        }
    }
    let mut total = 0usize;
    for t in &trees {
        total += t.left_children.as_ref().map_or(0, Vec::len);
    }
    if total > MAX_NODES {
        return Err(GbtError::TooLarge(format!(
            "{total} nodes, over the bound of {MAX_NODES}"
        )));
    }

    let mut nodes: Vec<Node> = Vec::with_capacity(total);
    let mut refs = Vec::with_capacity(trees.len());
    for (t, tree) in trees.iter().enumerate() {
        refs.push(lay_out(t, tree, num_feature, &mut nodes)?);
    }
    let group_depth = refs
        .chunks_exact(LANES)
        .map(|g| g.iter().map(|t| t.depth).max().unwrap_or(0))
        .collect();
    Ok(GbtModel {
        nodes,
        trees: refs,
        group_depth,
        num_feature,
        base_margin,
        link,
        objective,
    })
}

/// Check one tree and append its reachable nodes breadth-first to `out`.
fn lay_out(
    t: usize,
    tree: &Tree,
    num_feature: usize,
    out: &mut Vec<Node>,
) -> Result<TreeRef, GbtError> {
    let terr = |problem: String| GbtError::Tree { tree: t, problem };
    let need = |v: Option<&Vec<_>>, name: &str| -> Result<usize, GbtError> {
        v.map(Vec::len)
            .ok_or_else(|| terr(format!("missing field `{name}`")))
    };
    let left = tree.left_children.as_ref();
    let n = need(left, "left_children")?;
    let lens = [
        (
            "right_children",
            need(tree.right_children.as_ref(), "right_children")?,
        ),
        (
            "split_indices",
            need(tree.split_indices.as_ref(), "split_indices")?,
        ),
        (
            "split_conditions",
            tree.split_conditions
                .as_ref()
                .map(Vec::len)
                .ok_or_else(|| terr("missing field `split_conditions`".into()))?,
        ),
        (
            "default_left",
            tree.default_left
                .as_ref()
                .map(Vec::len)
                .ok_or_else(|| terr("missing field `default_left`".into()))?,
        ),
    ];
    for (name, len) in lens {
        if len != n {
            return Err(terr(format!(
                "`{name}` has {len} entries, `left_children` {n}"
            )));
        }
    }
    if n == 0 {
        return Err(terr("no nodes".into()));
    }
    if let Some(st) = &tree.split_type {
        if st.len() != n {
            return Err(terr(format!(
                "`split_type` has {} entries, `left_children` {n}",
                st.len()
            )));
        }
    }
    if let Some(p) = &tree.tree_param {
        let f = |k: &str| format!("trees[{t}].tree_param.{k}");
        if let Some(nn) = param_usize(p, "num_nodes", &f("num_nodes"))? {
            if nn != n {
                return Err(terr(format!(
                    "`tree_param.num_nodes` says {nn}, the arrays hold {n}"
                )));
            }
        }
        if let Some(s) = param_usize(p, "size_leaf_vector", &f("size_leaf_vector"))? {
            if s > 1 {
                return Err(terr(format!(
                    "leaf vectors of size {s} (a multi-target tree) are not supported"
                )));
            }
        }
    }
    let (lc, rc) = (
        tree.left_children.as_ref().unwrap(),
        tree.right_children.as_ref().unwrap(),
    );
    let (si, sc) = (
        tree.split_indices.as_ref().unwrap(),
        tree.split_conditions.as_ref().unwrap(),
    );
    let dl = tree.default_left.as_ref().unwrap();

    let base = out.len();
    let mut seen = vec![false; n];
    // (index in the file, index in `out`, depth)
    let mut queue = std::collections::VecDeque::new();
    out.push(Node {
        value: 0.0,
        feature: 0,
        left: 0,
        flags: 0,
    });
    queue.push_back((0usize, base, 0u32));
    seen[0] = true;
    let mut depth = 0;
    while let Some((i, at, d)) = queue.pop_front() {
        let nerr = |problem: String| GbtError::Node {
            tree: t,
            node: i,
            problem,
        };
        depth = depth.max(d);
        let (l, r) = (lc[i], rc[i]);
        if l == -1 && r == -1 {
            let v = sc[i];
            if !v.is_finite() {
                return Err(nerr(format!("leaf value {v} is not finite")));
            }
            out[at] = Node {
                value: v,
                feature: 0,
                left: at as u32,
                flags: 0,
            };
            continue;
        }
        if l == -1 || r == -1 {
            return Err(nerr(format!("one child only (left {l}, right {r})")));
        }
        if d + 1 > MAX_DEPTH {
            return Err(terr(format!("deeper than the bound of {MAX_DEPTH}")));
        }
        for (side, c) in [("left", l), ("right", r)] {
            if c < 0 || c as usize >= n {
                return Err(nerr(format!(
                    "{side} child {c} is out of range (the tree has {n} nodes)"
                )));
            }
            if seen[c as usize] {
                return Err(nerr(format!(
                    "{side} child {c} is reached twice (a cycle or a shared node)"
                )));
            }
            seen[c as usize] = true;
        }
        if tree.split_type.as_ref().is_some_and(|st| st[i] != 0) {
            return Err(nerr("categorical split: not supported".into()));
        }
        let f = si[i];
        if f < 0 || f as usize >= num_feature {
            return Err(nerr(format!(
                "split feature {f} is out of range (num_feature is {num_feature})"
            )));
        }
        let cond = sc[i];
        if cond.is_nan() {
            return Err(nerr("split condition is NaN".into()));
        }
        let child = out.len();
        out.push(Node {
            value: 0.0,
            feature: 0,
            left: 0,
            flags: 0,
        });
        out.push(Node {
            value: 0.0,
            feature: 0,
            left: 0,
            flags: 0,
        });
        out[at] = Node {
            value: cond,
            feature: f as u32,
            left: child as u32,
            flags: SPLIT | if dl[i].0 { DEFAULT_LEFT } else { 0 },
        };
        queue.push_back((l as usize, child, d + 1));
        queue.push_back((r as usize, child + 1, d + 1));
    }
    Ok(TreeRef {
        root: base as u32,
        depth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// One stump on feature 0 at 0.5, missing goes left: -1 left, +2 right; plus a leaf-only tree.
    fn model(objective: &str, base_score: &str) -> Value {
        json!({
            "version": [2, 1, 0],
            "learner": {
                "objective": {"name": objective},
                "learner_model_param": {"base_score": base_score, "num_class": "0",
                    "num_feature": "2", "num_target": "1"},
                "gradient_booster": {"name": "gbtree", "model": {
                    "gbtree_model_param": {"num_trees": "2", "num_parallel_tree": "1"},
                    "tree_info": [0, 0],
                    "trees": [
                        {"left_children": [1, -1, -1], "right_children": [2, -1, -1],
                         "split_indices": [0, 0, 0], "split_conditions": [0.5, -1.0, 2.0],
                         "default_left": [1, 0, 0], "split_type": [0, 0, 0],
                         "base_weights": [0.0, -1.0, 2.0],
                         "tree_param": {"num_nodes": "3", "num_feature": "2", "size_leaf_vector": "1"}},
                        {"left_children": [-1], "right_children": [-1], "split_indices": [0],
                         "split_conditions": [0.25], "default_left": [0], "base_weights": [0.25],
                         "tree_param": {"num_nodes": "3", "num_feature": "2", "size_leaf_vector": "1"}}
                    ]}}
            }
        })
    }

    fn load(v: &Value) -> Result<GbtModel, GbtError> {
        GbtModel::from_json(&v.to_string())
    }

    fn err(v: &Value) -> String {
        load(v).unwrap_err().to_string()
    }

    fn fixed(v: Value) -> Value {
        // the leaf-only tree's num_nodes is 1
        let mut v = v;
        v["learner"]["gradient_booster"]["model"]["trees"][1]["tree_param"]["num_nodes"] =
            json!("1");
        v
    }

    #[test]
    fn gbt_scores_stump() {
        let m = load(&fixed(model("reg:squarederror", "1E0"))).unwrap();
        assert_eq!(m.num_trees(), 2);
        assert_eq!(m.margin(&[0.0, 9.0]), 1.0 - 1.0 + 0.25);
        // strict `<`: equal goes right
        assert_eq!(m.margin(&[0.5, 9.0]), 1.0 + 2.0 + 0.25);
        // missing goes left (default_left)
        assert_eq!(m.margin(&[f32::NAN, 9.0]), 1.0 - 1.0 + 0.25);
        // a short vector: absent features are missing
        assert_eq!(m.margin(&[]), 1.0 - 1.0 + 0.25);
        assert_eq!(m.predict(&[0.6, 0.0]), m.margin(&[0.6, 0.0]));
    }

    #[test]
    fn gbt_logistic_base_score_is_a_probability() {
        let m = load(&fixed(model("binary:logistic", "[5E-1]"))).unwrap();
        assert_eq!(m.base_margin(), 0.0);
        let p = m.predict(&[0.0, 0.0]);
        assert!((p - 1.0 / (1.0 + 0.75f32.exp())).abs() < 1e-7, "{p}");
        let e = err(&fixed(model("binary:logistic", "1.5")));
        assert!(e.contains("base_score") && e.contains("(0, 1)"), "{e}");
    }

    #[test]
    fn gbt_refuses_with_named_problems() {
        let good = fixed(model("binary:logistic", "5E-1"));
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|v| v["learner"]["objective"]["name"] = json!("multi:softprob")),
                "multi:softprob",
            ),
            (
                Box::new(|v| v["learner"]["learner_model_param"]["num_class"] = json!("3")),
                "num_class",
            ),
            (
                Box::new(|v| v["version"] = json!([4, 0, 0])),
                "XGBoost 4.0.0",
            ),
            (Box::new(|v| v["version"] = json!([0, 90])), "XGBoost 0.90"),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"] =
                        json!({"name": "gblinear", "model": {"weights": [1.0]}})
                }),
                "gblinear",
            ),
            (
                Box::new(|v| v["learner"]["gradient_booster"]["name"] = json!("dart")),
                "dart",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["split_indices"][0] =
                        json!(2)
                }),
                "tree 0, node 0: split feature 2 is out of range",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["left_children"][0] =
                        json!(7)
                }),
                "tree 0, node 0: left child 7 is out of range",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["right_children"][0] =
                        json!(0)
                }),
                "right child 0 is reached twice",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["right_children"][0] =
                        json!(1)
                }),
                "right child 1 is reached twice",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["split_type"][0] =
                        json!(1)
                }),
                "categorical",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]["default_left"] =
                        json!([1])
                }),
                "`default_left` has 1 entries",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["tree_info"] = json!([0, 1])
                }),
                "tree_info",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["gbtree_model_param"]["num_trees"] =
                        json!("3")
                }),
                "num_trees",
            ),
            (
                Box::new(|v| v["learner"]["learner_model_param"]["num_feature"] = json!("0")),
                "num_feature",
            ),
            (
                Box::new(|v| {
                    v["learner"]["learner_model_param"]["base_score"] = json!("[1E-1,2E-1]")
                }),
                "more than one value",
            ),
            (
                Box::new(|v| {
                    v["learner"]["learner_model_param"]
                        .as_object_mut()
                        .unwrap()
                        .remove("num_feature");
                }),
                "missing field `learner.learner_model_param.num_feature`",
            ),
            (
                Box::new(|v| {
                    v["learner"]["gradient_booster"]["model"]["trees"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("split_conditions");
                }),
                "tree 0: missing field `split_conditions`",
            ),
        ];
        assert!(load(&good).is_ok());
        for (i, (mutate, want)) in cases.iter().enumerate() {
            let mut v = good.clone();
            mutate(&mut v);
            let e = err(&v);
            assert!(e.contains(want), "case {i}: `{e}` does not name `{want}`");
        }
        let text = good.to_string();
        let e = GbtModel::from_json(&text[..text.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a valid XGBoost JSON model") && e.contains("EOF"),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Mutated files are refused or loaded, never a panic; a loaded one scores anything.
        #[test]
        fn gbt_mutated_files_never_panic(
            pos in 0usize..4096, len in 0usize..8, repl in "[-0-9\\]\\[{}\",:.eE]{0,6}",
            x in proptest::collection::vec(prop_oneof![any::<f32>(), Just(f32::NAN)], 0..3)
        ) {
            let text = fixed(model("binary:logistic", "5E-1")).to_string();
            let pos = pos % text.len();
            let end = (pos + len).min(text.len());
            let mutated = format!("{}{}{}", &text[..pos], repl, &text[end..]);
            if let Ok(m) = GbtModel::from_json(&mutated) {
                let _ = m.predict(&x);
            }
        }

        /// Any child/feature index, in or out of range, is checked.
        #[test]
        fn gbt_any_index_is_checked(
            l in -3i64..6, r in -3i64..6, f in -2i64..4, node in 0usize..3
        ) {
            let mut v = fixed(model("reg:squarederror", "0"));
            let t = &mut v["learner"]["gradient_booster"]["model"]["trees"][0];
            t["left_children"][node] = json!(l);
            t["right_children"][node] = json!(r);
            t["split_indices"][node] = json!(f);
            if let Ok(m) = load(&v) {
                let _ = m.margin(&[0.1, 0.2]);
                let _ = m.margin(&[f32::NAN]);
            }
        }
    }
}
