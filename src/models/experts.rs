//! The routed experts of a MoE layer in one of three runtime forms, chosen at load:
//!
//! - [`RoutedExperts::Dense`]: one dense `[out, in]` matrix per expert and matrix type (per-expert
//!   checkpoints);
//! - [`RoutedExperts::Stacked`]: `[n, out, in]` stacks, each routed expert's slice taken in place
//!   (fused checkpoints, `gate_up_proj` / `down_proj`);
//! - [`RoutedExperts::Factored`]: rfid-moe's compressed groups. For gate and up, whose input is
//!   the layer input, `act(B_g)·x` is computed once for all tokens routed to any member of group
//!   `g`, then each member applies its `A_i` to its own rows. Experts the record keeps dense stay
//!   dense. A residual is expanded to a dense `[out, in]` per member at load; a compact form
//!   replaces that with the compact form. Factors and dense members stored as int8 stay int8
//!   codes in memory ([`Weight`]) and are dequantised each time they are used (a SiLU-activated
//!   basis is held activated, dense).
//!
//! All three give the same function; `checkpoint::experts` supplies their tensors.

use candle_core::{DType, Device, Module, Tensor};

use super::common::matmul_transposed;
use super::routing::{ExpertDispatch, GroupRoute, Routing};
use crate::checkpoint::experts::{BasisSide, ExpertLayout, ExpertMatrix, StoredGroup};
use crate::checkpoint::weight::{Int8Holding, Weight};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::format::CompressionRecord;

/// Which runtime form a layer's experts take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertsForm {
    /// One dense matrix per expert.
    Dense,
    /// `[n, out, in]` stacks.
    Stacked,
    /// Factored groups (with dense experts where the record keeps them).
    Factored,
}

impl ExpertsForm {
    /// The natural form of `layer`: factored when the compression record factors any of its
    /// groups or covers it with int8 storage (whose dense members only the factored form keeps
    /// int8), stacked when the checkpoint stores fused 3-D tensors or the experts go to a CUDA
    /// device (where stacks run through the fused MoE GEMM), dense otherwise.
    pub fn for_layer(
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        device: &Device,
    ) -> Self {
        // Factored groups, or members stored as int8 codes or packed blocks, need the factored
        // form (the only one holding such weights resident).
        let factored = compression.is_some_and(|c| {
            c.layer(layer).is_some_and(|l| {
                l.matrices.values().flat_map(|m| &m.groups).any(|g| {
                    !g.dense
                        || (0..g.experts.len()).any(|slot| {
                            g.is_int8(slot, c.factor_storage.as_deref()) || g.is_packed(slot)
                        })
                })
            })
        });
        if factored {
            Self::Factored
        } else if device.is_cuda()
            || ExpertMatrix::ALL
                .iter()
                .all(|&m| layout.is_fused(checkpoint, m))
        {
            Self::Stacked
        } else {
            Self::Dense
        }
    }
}

/// The three matrices of one expert, dense.
#[derive(Debug, Clone)]
pub struct DenseExpert {
    /// Gate projection, [p, d].
    pub gate: Tensor,
    /// Up projection, [p, d].
    pub up: Tensor,
    /// Down projection, [d, p].
    pub down: Tensor,
}

/// All experts' matrices as stacks.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    /// Gate projections, [n, p, d].
    pub gate: Tensor,
    /// Up projections, [n, p, d].
    pub up: Tensor,
    /// Down projections, [n, d, p].
    pub down: Tensor,
}

impl StackedExperts {
    /// `Σ_e w_e · expert_e(x)` through candle-nn's fused MoE GEMM, without copying the routing
    /// to the host; `None` where that kernel does not apply (it needs CUDA and bf16/f16 weights
    /// in the activations' dtype).
    #[cfg(feature = "cuda")]
    pub fn forward_fused(&self, x: &Tensor, routing: &Routing) -> Result<Option<Tensor>> {
        use candle_nn::moe::moe_gemm;
        let dtype = x.dtype();
        if !x.device().is_cuda()
            || !matches!(dtype, DType::BF16 | DType::F16)
            || [&self.gate, &self.up, &self.down]
                .iter()
                .any(|w| w.dtype() != dtype || !starts_its_storage(w))
        {
            return Ok(None);
        }
        let (tokens, hidden) = x.dims2()?;
        let top_k = routing.top_k;
        let intermediate = self.gate.dim(1)?;
        // candle's CUDA sort holds every slot in shared memory (up to 8192 u32 slots), and the
        // kernel loads eight values at a time along the inner dimension.
        if tokens * top_k > 8192 || hidden % 8 != 0 || intermediate % 8 != 0 {
            return Ok(None);
        }
        let prefill = tokens > 1;
        // The kernel reads raw storage: inputs must be contiguous and start at offset 0.
        let x = fresh(x)?;
        let (expert_ids, sorted_slots) = routing.experts.flatten_all()?.sort_last_dim(true)?;
        let (expert_ids, sorted_slots) = (fresh(&expert_ids)?, fresh(&sorted_slots)?);
        let project =
            |w: &Tensor| moe_gemm(&x, w, &None, &sorted_slots, &expert_ids, top_k, prefill);
        let hidden_rows = fresh(&gated_product(&project(&self.gate)?, &project(&self.up)?)?)?;
        let weights = fresh(&routing.weights.to_dtype(DType::F32)?.flatten_all()?)?;
        let y = moe_gemm(
            &hidden_rows,
            &self.down,
            &Some(weights),
            &sorted_slots,
            &expert_ids,
            top_k,
            prefill,
        )?;
        Ok(Some(y.reshape((tokens, top_k, hidden))?.sum(1)?))
    }

    /// Without CUDA there is no fused kernel.
    #[cfg(not(feature = "cuda"))]
    pub fn forward_fused(&self, _x: &Tensor, _routing: &Routing) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Whether `t` is contiguous from the start of its storage (what raw-pointer kernels need).
fn starts_its_storage(t: &Tensor) -> bool {
    t.is_contiguous() && t.layout().start_offset() == 0
}

/// `t` itself when it starts its storage contiguously, else a fresh contiguous copy.
fn fresh(t: &Tensor) -> candle_core::Result<Tensor> {
    if starts_its_storage(t) {
        Ok(t.clone())
    } else {
        t.contiguous()?.copy()
    }
}

/// One factored group of one matrix type, ready to run.
#[derive(Debug, Clone)]
pub struct FactorGroup {
    /// Member experts.
    pub experts: Vec<usize>,
    /// `act(B)`, [rank, in] (input side), or `U`, [out, rank] (output side).
    pub basis: Weight,
    /// Per member: `A_i` [out, rank] (input side) or `C_i` [rank, in] (output side).
    pub coefficients: Vec<Weight>,
    /// Dense residual per member, [out, in] (expanded at load).
    pub residuals: Option<Vec<Tensor>>,
    /// Which side the basis is shared on.
    pub side: BasisSide,
}

impl FactorGroup {
    /// Prepares a stored group for inference (activates the basis, expands the residual).
    pub fn from_stored(stored: &StoredGroup) -> Result<Self> {
        Ok(Self {
            experts: stored.experts.clone(),
            basis: stored.activated_basis()?,
            coefficients: stored.coefficients.clone(),
            residuals: stored.member_residuals()?,
            side: stored.side,
        })
    }

    /// `A_i·act(B) + R_i` (or `U·C_i`) for member `slot`, [out, in].
    fn dense(&self, slot: usize) -> Result<Tensor> {
        let (basis, coefficients) = (self.basis.matrix()?, self.coefficients[slot].matrix()?);
        let w = match self.side {
            BasisSide::Input => coefficients.matmul(&basis)?,
            BasisSide::Output => basis.matmul(&coefficients)?,
        };
        Ok(match &self.residuals {
            Some(r) => (w + &r[slot])?,
            None => w,
        })
    }

    /// Member `slot`'s matrix applied to its own rows `x` [count, in].
    fn forward_member(&self, slot: usize, x: &Tensor) -> Result<Tensor> {
        let (basis, coefficients) = (self.basis.matrix()?, self.coefficients[slot].matrix()?);
        let y = match self.side {
            BasisSide::Input => {
                let projected = matmul_transposed(x, &basis)?;
                matmul_transposed(&projected, &coefficients)?
            }
            BasisSide::Output => {
                let coefficients = matmul_transposed(x, &coefficients)?;
                matmul_transposed(&coefficients, &basis)?
            }
        };
        self.add_residual(slot, x, y)
    }

    /// Adds member `slot`'s residual applied to `x` to `y`.
    fn add_residual(&self, slot: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match &self.residuals {
            Some(r) => Ok((y + matmul_transposed(x, &r[slot])?)?),
            None => Ok(y),
        }
    }

    /// Bytes held by the group's basis, coefficients and expanded residuals.
    pub fn resident_bytes(&self) -> u64 {
        let residuals = self
            .residuals
            .iter()
            .flatten()
            .map(tensor_bytes)
            .sum::<u64>();
        self.basis.resident_bytes()
            + self
                .coefficients
                .iter()
                .map(Weight::resident_bytes)
                .sum::<u64>()
            + residuals
    }
}

/// Bytes held by the elements of `t` (as viewed).
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Where an expert's matrix lives in a [`FactoredProjection`].
#[derive(Debug, Clone, Copy)]
enum Member {
    Dense(usize),
    Group { group: usize, slot: usize },
}

/// One matrix type of all experts: factored groups plus experts kept dense.
#[derive(Debug, Clone)]
pub struct FactoredProjection {
    groups: Vec<FactorGroup>,
    dense: Vec<Weight>,
    members: Vec<Member>,
}

impl FactoredProjection {
    /// Builds the projection of `num_experts` experts from factored `groups` and the dense
    /// matrices of the other experts (`(expert, [out, in])`, tensors or [`Weight`]s); every
    /// expert must be covered once.
    pub fn new(
        num_experts: usize,
        groups: Vec<FactorGroup>,
        dense: Vec<(usize, impl Into<Weight>)>,
    ) -> Result<Self> {
        let mut members = vec![None; num_experts];
        let mut place = |expert: usize, member: Member| -> Result<()> {
            match members.get_mut(expert) {
                Some(slot @ None) => {
                    *slot = Some(member);
                    Ok(())
                }
                Some(Some(_)) => Err(Error::InvalidArgument(format!(
                    "expert {expert} appears twice among factored groups and dense experts"
                ))),
                None => Err(Error::InvalidArgument(format!(
                    "expert {expert} is out of range for {num_experts} experts"
                ))),
            }
        };
        for (g, group) in groups.iter().enumerate() {
            if group.coefficients.len() != group.experts.len() {
                return Err(Error::InvalidArgument(format!(
                    "factored group {g} has {} members but {} coefficient matrices",
                    group.experts.len(),
                    group.coefficients.len()
                )));
            }
            for (slot, &e) in group.experts.iter().enumerate() {
                place(e, Member::Group { group: g, slot })?;
            }
        }
        let mut matrices = Vec::with_capacity(dense.len());
        for (e, w) in dense {
            place(e, Member::Dense(matrices.len()))?;
            matrices.push(w.into());
        }
        let members = members
            .into_iter()
            .enumerate()
            .map(|(e, m)| {
                m.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "expert {e} is neither in a factored group nor dense"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            groups,
            dense: matrices,
            members,
        })
    }

    /// Loads `matrix` of `layer`: the record's factored groups, and the remaining experts dense,
    /// int8-stored tensors held as `holding` says.
    pub fn load(
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        matrix: ExpertMatrix,
        (at, holding): ((DType, &Device), Int8Holding),
    ) -> Result<Self> {
        let stored = match compression {
            Some(c) => layout.load_groups(checkpoint, c, layer, matrix, at, holding)?,
            None => Vec::new(),
        };
        let mut covered = vec![false; layout.num_experts];
        stored
            .iter()
            .flat_map(|g| &g.experts)
            .for_each(|&e| covered[e] = true);
        let dense = (0..layout.num_experts)
            .filter(|&e| !covered[e])
            .map(|e| {
                let weight = layout.load_dense_weight(checkpoint, e, matrix, at, holding)?;
                Ok((e, weight))
            })
            .collect::<Result<Vec<_>>>()?;
        let groups = stored
            .iter()
            .map(FactorGroup::from_stored)
            .collect::<Result<Vec<_>>>()?;
        Self::new(layout.num_experts, groups, dense)
    }

    /// The factored groups.
    pub fn groups(&self) -> &[FactorGroup] {
        &self.groups
    }

    /// The experts held on their own (not in a factored group).
    pub fn dense_members(&self) -> impl Iterator<Item = &Weight> {
        self.dense.iter()
    }

    /// Bytes held by this projection's tensors: groups and dense experts.
    pub fn resident_bytes(&self) -> u64 {
        let groups: u64 = self.groups.iter().map(FactorGroup::resident_bytes).sum();
        groups + self.dense.iter().map(Weight::resident_bytes).sum::<u64>()
    }

    /// The effective dense matrix of `expert`, [out, in].
    pub fn dense_matrix(&self, expert: usize) -> Result<Tensor> {
        match self.member(expert)? {
            Member::Dense(i) => self.dense[i].matrix(),
            Member::Group { group, slot } => self.groups[group].dense(slot),
        }
    }

    fn member(&self, expert: usize) -> Result<Member> {
        self.members.get(expert).copied().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "expert {expert} is out of range for {} experts",
                self.members.len()
            ))
        })
    }

    /// Applies `expert`'s matrix to its own input rows `x` [count, in].
    pub fn forward_expert(&self, expert: usize, x: &Tensor) -> Result<Tensor> {
        match self.member(expert)? {
            Member::Dense(i) => self.dense[i].forward(x),
            Member::Group { group, slot } => self.groups[group].forward_member(slot, x),
        }
    }

    /// `out + Σ_e w_e · W_e h_e` over the routed experts, for `hidden[e]` = expert e's own input
    /// rows (in its route's token order, `None` without tokens) and `out` [tokens, out]. An
    /// output-side group adds `w_e · C_e h_e` of its members into one [union, rank] sum on the
    /// union of their tokens and applies its basis `U` once; other experts are added one by one.
    pub fn combine_routed(
        &self,
        mut out: Tensor,
        hidden: &[Option<Tensor>],
        dispatch: &ExpertDispatch,
        routes: &mut GroupRoutes,
    ) -> Result<Tensor> {
        if hidden.len() != self.members.len() {
            return Err(Error::InvalidArgument(format!(
                "{} experts' inputs for a projection of {} experts",
                hidden.len(),
                self.members.len()
            )));
        }
        let weighted = |y: Tensor, weights: &Tensor| -> Result<Tensor> {
            Ok(y.broadcast_mul(&weights.to_dtype(y.dtype())?)?)
        };
        for (expert, member) in self.members.iter().enumerate() {
            let (Some(h), Some(route)) = (&hidden[expert], dispatch.route(expert)) else {
                continue;
            };
            let y = match *member {
                Member::Dense(i) => self.dense[i].forward(h)?,
                Member::Group { group, slot } => match &self.groups[group] {
                    g if g.side == BasisSide::Output => continue,
                    g => g.forward_member(slot, h)?,
                },
            };
            out = out.index_add(&route.tokens, &weighted(y, &route.weights)?, 0)?;
        }
        for group in self.groups.iter().filter(|g| g.side == BasisSide::Output) {
            let Some(route) = routes.get(dispatch, &group.experts)? else {
                continue;
            };
            let (union, rank) = (route.tokens.dim(0)?, group.basis.dim(1)?);
            let basis = group.basis.matrix()?;
            let mut sum = Tensor::zeros((union, rank), out.dtype(), out.device())?;
            for (slot, positions) in route.positions.iter().enumerate() {
                let expert = group.experts[slot];
                let (Some(positions), Some(h), Some(member_route)) =
                    (positions, &hidden[expert], dispatch.route(expert))
                else {
                    continue;
                };
                let c = matmul_transposed(h, &group.coefficients[slot].matrix()?)?;
                sum = sum.index_add(positions, &weighted(c, &member_route.weights)?, 0)?;
            }
            out = out.index_add(&route.tokens, &matmul_transposed(&sum, &basis)?, 0)?;
        }
        Ok(out)
    }

    /// Applies every routed expert's matrix to its tokens of the shared input `x` [tokens, in]:
    /// per expert, its rows of the output (in its route's token order), `None` without tokens.
    /// Each group's basis is applied once to the union of its members' tokens; `routes` keeps
    /// the group routes for the next matrix with the same groups.
    pub fn forward_routed(
        &self,
        x: &Tensor,
        dispatch: &ExpertDispatch,
        routes: &mut GroupRoutes,
    ) -> Result<Vec<Option<Tensor>>> {
        let rows = |expert: usize| -> Result<Option<Tensor>> {
            dispatch
                .route(expert)
                .map(|r| x.index_select(&r.tokens, 0))
                .transpose()
                .map_err(Into::into)
        };
        let mut out: Vec<Option<Tensor>> = vec![None; self.members.len()];
        for (expert, member) in self.members.iter().enumerate() {
            if let (Member::Dense(i), Some(x_e)) = (member, rows(expert)?) {
                out[expert] = Some(self.dense[*i].forward(&x_e)?);
            }
        }
        for group in &self.groups {
            if group.side == BasisSide::Output {
                for (slot, &expert) in group.experts.iter().enumerate() {
                    if let Some(x_e) = rows(expert)? {
                        out[expert] = Some(group.forward_member(slot, &x_e)?);
                    }
                }
                continue;
            }
            let Some(route) = routes.get(dispatch, &group.experts)? else {
                continue;
            };
            let basis = group.basis.matrix()?;
            let projected = matmul_transposed(&x.index_select(&route.tokens, 0)?, &basis)?;
            for (slot, positions) in route.positions.iter().enumerate() {
                let (Some(positions), expert) = (positions, group.experts[slot]) else {
                    continue;
                };
                let z = projected.index_select(positions, 0)?;
                let y = matmul_transposed(&z, &group.coefficients[slot].matrix()?)?;
                let y = match &group.residuals {
                    Some(_) => match rows(expert)? {
                        Some(x_e) => group.add_residual(slot, &x_e, y)?,
                        None => y,
                    },
                    None => y,
                };
                out[expert] = Some(y);
            }
        }
        Ok(out)
    }
}

/// The group routes of one layer's dispatch, computed once per distinct group and shared by
/// the matrix types whose groups coincide (gate and up usually do).
#[derive(Debug, Default)]
pub struct GroupRoutes(std::collections::HashMap<Vec<usize>, Option<GroupRoute>>);

impl GroupRoutes {
    /// The route of the group `members` under `dispatch`.
    fn get(&mut self, dispatch: &ExpertDispatch, members: &[usize]) -> Result<Option<&GroupRoute>> {
        if !self.0.contains_key(members) {
            let route = dispatch.group_route(members)?;
            self.0.insert(members.to_vec(), route);
        }
        Ok(self.0.get(members).and_then(Option::as_ref))
    }
}

/// Gate, up and down of all experts, each factored or dense per expert.
#[derive(Debug, Clone)]
pub struct FactoredExperts {
    /// Gate projections.
    pub gate: FactoredProjection,
    /// Up projections.
    pub up: FactoredProjection,
    /// Down projections.
    pub down: FactoredProjection,
}

/// The routed experts of a layer, in the runtime form chosen at load.
#[derive(Debug, Clone)]
pub enum RoutedExperts {
    /// One dense matrix per expert and matrix type.
    Dense(Vec<DenseExpert>),
    /// `[n, out, in]` stacks.
    Stacked(StackedExperts),
    /// Factored groups (boxed: three projections with their groups).
    Factored(Box<FactoredExperts>),
}

impl Default for RoutedExperts {
    fn default() -> Self {
        Self::Dense(Vec::new())
    }
}

/// `weight` in the dtype of `activations` (a no-op when they already agree): experts may be held
/// in the checkpoint's narrower dtype and still compute in the activations' precision.
fn in_dtype_of(weight: &Tensor, activations: &Tensor) -> candle_core::Result<Tensor> {
    weight.to_dtype(activations.dtype())
}

/// `silu(gate) * up`.
fn gated_product(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::Activation::Silu.forward(gate)? * up
}

impl RoutedExperts {
    /// Loads the experts of `layer` in the form [`ExpertsForm::for_layer`] picks.
    pub fn load(
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let form = ExpertsForm::for_layer(layout, checkpoint, layer, compression, device);
        Self::load_as(form, layout, checkpoint, layer, compression, dtype, device)
    }

    /// [`Self::load`] with int8-stored factors and dense members held as `holding` says
    /// ([`Int8Holding::Dequantised`] is the dequantise-at-load reference that the resident
    /// default must match bit for bit).
    pub fn load_holding_int8(
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        (dtype, device): (DType, &Device),
        holding: Int8Holding,
    ) -> Result<Self> {
        match ExpertsForm::for_layer(layout, checkpoint, layer, compression, device) {
            ExpertsForm::Factored => {
                let at = ((dtype, device), holding);
                Self::load_factored(layout, checkpoint, layer, compression, at)
            }
            form => Self::load_as(form, layout, checkpoint, layer, compression, dtype, device),
        }
    }

    /// The factored form of `layer`'s experts.
    fn load_factored(
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        at: ((DType, &Device), Int8Holding),
    ) -> Result<Self> {
        let load = |m| FactoredProjection::load(layout, checkpoint, layer, compression, m, at);
        Ok(Self::Factored(Box::new(FactoredExperts {
            gate: load(ExpertMatrix::Gate)?,
            up: load(ExpertMatrix::Up)?,
            down: load(ExpertMatrix::Down)?,
        })))
    }

    /// Loads the experts of `layer` in `form` (a record's factors are honoured only by
    /// [`ExpertsForm::Factored`]; the other forms need dense experts on disk).
    pub fn load_as(
        form: ExpertsForm,
        layout: &ExpertLayout,
        checkpoint: &Checkpoint,
        layer: usize,
        compression: Option<&CompressionRecord>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(match form {
            ExpertsForm::Dense => {
                let [gate, up, down] =
                    ExpertMatrix::ALL.map(|m| layout.load_matrix(checkpoint, m, dtype, device));
                let (gate, up, down) = (gate?, up?, down?);
                Self::Dense(
                    gate.into_iter()
                        .zip(up)
                        .zip(down)
                        .map(|((gate, up), down)| DenseExpert { gate, up, down })
                        .collect(),
                )
            }
            ExpertsForm::Stacked => {
                let load = |m| -> Result<Tensor> {
                    Ok(fresh(&layout.load_stacked(checkpoint, m, dtype, device)?)?)
                };
                Self::Stacked(StackedExperts {
                    gate: load(ExpertMatrix::Gate)?,
                    up: load(ExpertMatrix::Up)?,
                    down: load(ExpertMatrix::Down)?,
                })
            }
            ExpertsForm::Factored => {
                let at = ((dtype, device), Int8Holding::Resident);
                Self::load_factored(layout, checkpoint, layer, compression, at)?
            }
        })
    }

    /// Bytes held by the routed experts' tensors (int8 factors as codes and scales; an
    /// expanded residual as its dense matrices).
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Self::Dense(experts) => experts
                .iter()
                .map(|e| tensor_bytes(&e.gate) + tensor_bytes(&e.up) + tensor_bytes(&e.down))
                .sum(),
            Self::Stacked(s) => tensor_bytes(&s.gate) + tensor_bytes(&s.up) + tensor_bytes(&s.down),
            Self::Factored(f) => {
                f.gate.resident_bytes() + f.up.resident_bytes() + f.down.resident_bytes()
            }
        }
    }

    /// The form of these experts.
    pub fn form(&self) -> ExpertsForm {
        match self {
            Self::Dense(_) => ExpertsForm::Dense,
            Self::Stacked(_) => ExpertsForm::Stacked,
            Self::Factored(_) => ExpertsForm::Factored,
        }
    }

    /// Number of routed experts.
    pub fn len(&self) -> usize {
        match self {
            Self::Dense(experts) => experts.len(),
            Self::Stacked(s) => s.gate.dim(0).unwrap_or(0),
            Self::Factored(f) => f.gate.members.len(),
        }
    }

    /// Whether there are no experts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The effective dense matrix [out, in] of `matrix` for `expert`.
    pub fn dense_matrix(&self, expert: usize, matrix: ExpertMatrix) -> Result<Tensor> {
        let out_of_range = || {
            Error::InvalidArgument(format!(
                "expert {expert} is out of range for {} experts",
                self.len()
            ))
        };
        if expert >= self.len() {
            return Err(out_of_range());
        }
        match self {
            Self::Dense(experts) => {
                let e = &experts[expert];
                Ok(match matrix {
                    ExpertMatrix::Gate => e.gate.clone(),
                    ExpertMatrix::Up => e.up.clone(),
                    ExpertMatrix::Down => e.down.clone(),
                })
            }
            Self::Stacked(s) => {
                let stack = match matrix {
                    ExpertMatrix::Gate => &s.gate,
                    ExpertMatrix::Up => &s.up,
                    ExpertMatrix::Down => &s.down,
                };
                Ok(stack.get(expert)?)
            }
            Self::Factored(f) => match matrix {
                ExpertMatrix::Gate => f.gate.dense_matrix(expert),
                ExpertMatrix::Up => f.up.dense_matrix(expert),
                ExpertMatrix::Down => f.down.dense_matrix(expert),
            },
        }
    }

    /// `Σ_e w_e · expert_e(x)` straight from the device routing when a fused kernel applies
    /// (stacked experts on CUDA in bf16/f16); `None` otherwise.
    pub fn forward_fused(&self, x: &Tensor, routing: &Routing) -> Result<Option<Tensor>> {
        match self {
            Self::Stacked(s) => s.forward_fused(x, routing),
            _ => Ok(None),
        }
    }

    /// `Σ_e w_e · expert_e(x)` over each token's routed experts, for `x` [tokens, hidden].
    /// Factored experts apply an output-side (down) basis once per group
    /// ([`FactoredProjection::combine_routed`]).
    pub fn forward(&self, x: &Tensor, dispatch: &ExpertDispatch) -> Result<Tensor> {
        match self {
            Self::Factored(f) => {
                self.check_dispatch(dispatch)?;
                let mut routes = GroupRoutes::default();
                let hidden = f.intermediates(x, dispatch, &mut routes)?;
                f.down
                    .combine_routed(x.zeros_like()?, &hidden, dispatch, &mut routes)
            }
            _ => combine_outputs(x, self.expert_outputs(x, dispatch)?, dispatch),
        }
    }

    fn check_dispatch(&self, dispatch: &ExpertDispatch) -> Result<()> {
        if dispatch.num_experts() != self.len() {
            return Err(Error::InvalidArgument(format!(
                "routing covers {} experts but the layer has {}",
                dispatch.num_experts(),
                self.len()
            )));
        }
        Ok(())
    }

    /// Each expert's unweighted output on the tokens routed to it ([count, hidden], rows in the
    /// order of [`ExpertDispatch::route`]'s tokens), `None` for experts without tokens.
    pub fn expert_outputs(
        &self,
        x: &Tensor,
        dispatch: &ExpertDispatch,
    ) -> Result<Vec<Option<Tensor>>> {
        let hidden = self.expert_intermediates(x, dispatch)?;
        self.down_outputs(hidden)
    }

    /// Each expert's intermediate activation `silu(gate·x) ⊙ (up·x)` on the tokens routed to it
    /// ([count, p], rows in the order of [`ExpertDispatch::route`]'s tokens), `None` for experts
    /// without tokens: the input of `down_proj`.
    pub fn expert_intermediates(
        &self,
        x: &Tensor,
        dispatch: &ExpertDispatch,
    ) -> Result<Vec<Option<Tensor>>> {
        self.check_dispatch(dispatch)?;
        let rows = || -> Result<Vec<Option<Tensor>>> {
            (0..self.len())
                .map(|e| {
                    dispatch
                        .route(e)
                        .map(|r| x.index_select(&r.tokens, 0))
                        .transpose()
                        .map_err(Into::into)
                })
                .collect()
        };
        let gated = |x_e: &Tensor, gate: &Tensor, up: &Tensor| -> Result<Tensor> {
            Ok(gated_product(
                &matmul_transposed(x_e, &in_dtype_of(gate, x_e)?)?,
                &matmul_transposed(x_e, &in_dtype_of(up, x_e)?)?,
            )?)
        };
        match self {
            Self::Dense(experts) => experts
                .iter()
                .zip(&rows()?)
                .map(|(e, x_e)| {
                    x_e.as_ref()
                        .map(|x_e| gated(x_e, &e.gate, &e.up))
                        .transpose()
                })
                .collect(),
            Self::Stacked(s) => rows()?
                .iter()
                .enumerate()
                .map(|(e, x_e)| {
                    x_e.as_ref()
                        .map(|x_e| gated(x_e, &s.gate.get(e)?, &s.up.get(e)?))
                        .transpose()
                })
                .collect(),
            Self::Factored(f) => f.intermediates(x, dispatch, &mut GroupRoutes::default()),
        }
    }

    /// Each expert's `down_proj` applied to its intermediate activation from
    /// [`Self::expert_intermediates`] (unweighted; `None` stays `None`).
    pub fn down_outputs(&self, hidden: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        hidden
            .into_iter()
            .enumerate()
            .map(|(e, h)| {
                h.map(|h| match self {
                    Self::Dense(experts) => {
                        matmul_transposed(&h, &in_dtype_of(&experts[e].down, &h)?)
                    }
                    Self::Stacked(s) => matmul_transposed(&h, &in_dtype_of(&s.down.get(e)?, &h)?),
                    Self::Factored(f) => f.down.forward_expert(e, &h),
                })
                .transpose()
            })
            .collect()
    }
}

impl FactoredExperts {
    /// Each expert's `silu(gate·x) ⊙ (up·x)` on its routed tokens, through the factored gate and
    /// up projections (sharing `routes`).
    fn intermediates(
        &self,
        x: &Tensor,
        dispatch: &ExpertDispatch,
        routes: &mut GroupRoutes,
    ) -> Result<Vec<Option<Tensor>>> {
        let gate = self.gate.forward_routed(x, dispatch, routes)?;
        let up = self.up.forward_routed(x, dispatch, routes)?;
        gate.iter()
            .zip(&up)
            .map(|pair| match pair {
                (Some(g), Some(u)) => Ok(Some(gated_product(g, u)?)),
                _ => Ok(None),
            })
            .collect()
    }
}

/// `Σ_e w_e · y_e` scattered back to the tokens: the block output from [`RoutedExperts::expert_outputs`].
pub fn combine_outputs(
    x: &Tensor,
    outputs: Vec<Option<Tensor>>,
    dispatch: &ExpertDispatch,
) -> Result<Tensor> {
    let mut out = x.zeros_like()?;
    for (expert, y) in outputs.into_iter().enumerate() {
        let (Some(y), Some(route)) = (y, dispatch.route(expert)) else {
            continue;
        };
        let weights = route.weights.to_dtype(y.dtype())?;
        out = out.index_add(&route.tokens, &y.broadcast_mul(&weights)?, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::experts::StoredResidual;
    use crate::format::BasisActivation;
    use crate::models::routing::{Routing, RoutingRule};
    use crate::residual::SparseProjection;
    use crate::rng::SplitMix64;

    const D: usize = 12;
    const P: usize = 7;
    const N: usize = 6;
    const TOKENS: usize = 29;

    fn random(seed: u64, shape: (usize, usize)) -> Tensor {
        let mut rng = SplitMix64::new(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.uniform() - 0.5) as f32)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Whether `t` has any weight at all (a comparison of two zero outputs proves nothing).
    fn is_nonzero(t: &Tensor) -> bool {
        t.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn shape(matrix: ExpertMatrix) -> (usize, usize) {
        match matrix {
            ExpertMatrix::Down => (D, P),
            _ => (P, D),
        }
    }

    /// Routing of `TOKENS` random tokens over `N` experts with top-2; expert `idle` gets none.
    fn routing(x: &Tensor, idle: Option<usize>) -> Routing {
        let gate = random(99, (N, D));
        let mut logits = matmul_transposed(x, &gate).unwrap();
        if let Some(idle) = idle {
            let mask: Vec<f32> = (0..N).map(|e| if e == idle { -1e9 } else { 0.0 }).collect();
            logits = logits
                .broadcast_add(&Tensor::new(mask.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let rule = RoutingRule::SoftmaxTopK {
            top_k: 2,
            normalize: true,
        };
        let (experts, weights) = rule.select(&logits).unwrap();
        Routing {
            logits,
            experts,
            weights,
            top_k: 2,
        }
    }

    fn dense_experts(seed: u64) -> Vec<DenseExpert> {
        (0..N as u64)
            .map(|e| DenseExpert {
                gate: random(seed + 3 * e, (P, D)),
                up: random(seed + 3 * e + 1, (P, D)),
                down: random(seed + 3 * e + 2, (D, P)),
            })
            .collect()
    }

    #[test]
    fn stacked_experts_match_dense_experts() {
        let x = random(1, (TOKENS, D));
        let dispatch = ExpertDispatch::new(&routing(&x, None), N).unwrap();
        let experts = dense_experts(10);
        let stack = |f: fn(&DenseExpert) -> &Tensor| {
            Tensor::stack(&experts.iter().map(f).cloned().collect::<Vec<_>>(), 0).unwrap()
        };
        let stacked = RoutedExperts::Stacked(StackedExperts {
            gate: stack(|e| &e.gate),
            up: stack(|e| &e.up),
            down: stack(|e| &e.down),
        });
        let dense = RoutedExperts::Dense(experts);
        let a = dense.forward(&x, &dispatch).unwrap();
        let b = stacked.forward(&x, &dispatch).unwrap();
        assert!(max_diff(&a, &b) <= 1e-6, "{}", max_diff(&a, &b));
        assert!(is_nonzero(&a));
        for m in ExpertMatrix::ALL {
            assert_eq!(
                max_diff(
                    &dense.dense_matrix(4, m).unwrap(),
                    &stacked.dense_matrix(4, m).unwrap()
                ),
                0.0
            );
        }
    }

    /// A stored group of `experts` for `matrix`, with a residual when `residual_size > 0`.
    fn stored_group(
        seed: u64,
        experts: Vec<usize>,
        matrix: ExpertMatrix,
        rank: usize,
        activation: BasisActivation,
        residual_size: usize,
    ) -> StoredGroup {
        let (out, cols) = shape(matrix);
        let side = BasisSide::of(matrix);
        // Input side: A_i [out, rank], B [rank, in]; output side: C_i [rank, in], U [out, rank].
        let (coefficient_shape, basis_shape) = match side {
            BasisSide::Input => ((out, rank), (rank, cols)),
            BasisSide::Output => ((rank, cols), (out, rank)),
        };
        StoredGroup {
            coefficients: (0..experts.len() as u64)
                .map(|i| Weight::Dense(random(seed + i, coefficient_shape)))
                .collect(),
            experts,
            basis: Weight::Dense(random(seed + 50, basis_shape)),
            activation,
            residual: (residual_size > 0).then(|| StoredResidual {
                eta: random(seed + 60, (1, residual_size)).flatten_all().unwrap(),
                seed: 77,
            }),
            side,
        }
    }

    /// The dense matrices `A_i·act(B) + P η` of a stored group, computed independently.
    fn reconstruction(group: &StoredGroup, matrix: ExpertMatrix) -> Vec<Tensor> {
        let (out, cols) = shape(matrix);
        let basis = group.basis.matrix().unwrap();
        let basis = match group.activation {
            BasisActivation::Identity => basis,
            BasisActivation::Silu => candle_nn::ops::silu(&basis).unwrap(),
        };
        let residual: Option<Vec<f32>> = group.residual.as_ref().map(|r| {
            let eta: Vec<f32> = r.eta.to_vec1().unwrap();
            SparseProjection::new(r.seed, group.experts.len() * out * cols, eta.len()).expand(&eta)
        });
        group
            .coefficients
            .iter()
            .enumerate()
            .map(|(slot, a)| {
                let a = a.matrix().unwrap();
                let w = match group.side {
                    BasisSide::Input => a.matmul(&basis).unwrap(),
                    BasisSide::Output => basis.matmul(&a).unwrap(),
                };
                match &residual {
                    Some(r) => {
                        let part = r[slot * out * cols..(slot + 1) * out * cols].to_vec();
                        (w + Tensor::from_vec(part, (out, cols), &Device::Cpu).unwrap()).unwrap()
                    }
                    None => w,
                }
            })
            .collect()
    }

    /// Factored projection of `matrix` from `groups`, the other experts dense from `dense`.
    fn factored(
        groups: &[StoredGroup],
        dense: &[DenseExpert],
        matrix: ExpertMatrix,
    ) -> (FactoredProjection, Vec<Tensor>) {
        let pick = |e: &DenseExpert| match matrix {
            ExpertMatrix::Gate => e.gate.clone(),
            ExpertMatrix::Up => e.up.clone(),
            ExpertMatrix::Down => e.down.clone(),
        };
        let mut effective: Vec<Tensor> = dense.iter().map(pick).collect();
        for g in groups {
            for (slot, w) in reconstruction(g, matrix).into_iter().enumerate() {
                effective[g.experts[slot]] = w;
            }
        }
        let in_group: Vec<usize> = groups.iter().flat_map(|g| g.experts.clone()).collect();
        let kept = (0..N)
            .filter(|e| !in_group.contains(e))
            .map(|e| (e, pick(&dense[e])))
            .collect();
        let prepared = groups
            .iter()
            .map(|g| FactorGroup::from_stored(g).unwrap())
            .collect();
        (
            FactoredProjection::new(N, prepared, kept).unwrap(),
            effective,
        )
    }

    #[test]
    fn factored_experts_match_their_dense_reconstruction() {
        let x = random(2, (TOKENS, D));
        let dense = dense_experts(20);
        let gate_groups = [
            stored_group(
                200,
                vec![4, 0, 2],
                ExpertMatrix::Gate,
                3,
                BasisActivation::Silu,
                40,
            ),
            stored_group(
                210,
                vec![1, 5],
                ExpertMatrix::Gate,
                2,
                BasisActivation::Silu,
                0,
            ),
        ];
        let up_groups = [stored_group(
            300,
            vec![0, 1, 2, 3],
            ExpertMatrix::Up,
            4,
            BasisActivation::Silu,
            25,
        )];
        // Output-side down groups (U·C_i, the basis applied once to the members' weighted sum);
        // expert 4 stays dense.
        let down_groups = [
            stored_group(
                400,
                vec![3, 5],
                ExpertMatrix::Down,
                2,
                BasisActivation::Identity,
                0,
            ),
            stored_group(
                410,
                vec![1, 0, 2],
                ExpertMatrix::Down,
                4,
                BasisActivation::Identity,
                0,
            ),
        ];
        let (gate, gate_w) = factored(&gate_groups, &dense, ExpertMatrix::Gate);
        let (up, up_w) = factored(&up_groups, &dense, ExpertMatrix::Up);
        let (down, down_w) = factored(&down_groups, &dense, ExpertMatrix::Down);
        let experts = RoutedExperts::Factored(Box::new(FactoredExperts { gate, up, down }));
        let reference = RoutedExperts::Dense(
            (0..N)
                .map(|e| DenseExpert {
                    gate: gate_w[e].clone(),
                    up: up_w[e].clone(),
                    down: down_w[e].clone(),
                })
                .collect(),
        );
        for idle in [None, Some(0), Some(5)] {
            let dispatch = ExpertDispatch::new(&routing(&x, idle), N).unwrap();
            if let Some(idle) = idle {
                assert!(
                    dispatch.route(idle).is_none(),
                    "expert {idle} should get no token"
                );
            }
            let got = experts.forward(&x, &dispatch).unwrap();
            let want = reference.forward(&x, &dispatch).unwrap();
            assert!(
                max_diff(&got, &want) <= 1e-5,
                "idle {idle:?}: {}",
                max_diff(&got, &want)
            );
            // Expert by expert (the observers' path) gives the same sum.
            let outputs = experts.expert_outputs(&x, &dispatch).unwrap();
            let per_expert = combine_outputs(&x, outputs, &dispatch).unwrap();
            assert!(max_diff(&per_expert, &want) <= 1e-5, "idle {idle:?}");
            assert!(is_nonzero(&want));
        }
        for m in ExpertMatrix::ALL {
            for e in 0..N {
                let d = max_diff(
                    &experts.dense_matrix(e, m).unwrap(),
                    &reference.dense_matrix(e, m).unwrap(),
                );
                assert!(d <= 1e-6, "{m:?} expert {e}: {d}");
            }
        }
    }

    #[test]
    fn factored_projection_refuses_uncovered_or_doubled_experts() {
        let dense = dense_experts(30);
        let group = FactorGroup::from_stored(&stored_group(
            500,
            vec![0, 1],
            ExpertMatrix::Gate,
            2,
            BasisActivation::Identity,
            0,
        ))
        .unwrap();
        let others = |range: std::ops::Range<usize>| {
            range
                .map(|e| (e, dense[e].gate.clone()))
                .collect::<Vec<_>>()
        };
        assert!(FactoredProjection::new(N, vec![group.clone()], others(2..N)).is_ok());
        assert!(
            FactoredProjection::new(N, vec![group.clone()], others(3..N)).is_err(),
            "expert 2 uncovered"
        );
        assert!(
            FactoredProjection::new(N, vec![group], others(1..N)).is_err(),
            "expert 1 twice"
        );
    }
}
