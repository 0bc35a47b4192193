"""The shared base of the Kronecker-factored backends: ``KroneckerFactored``.

Each covered layer's block is built from two factors on the row-major homogeneous weight
matrix ``[W | b]`` (concepts/kronecker.md#notation-and-the-vec-convention;
concepts/kronecker.md#k-fac-for-linear-layers), permuted into the ``[vec(W), b]`` parameter
order:

* ``A = Σ ā āᵀ / count``: layer inputs with the homogeneous 1; expand averages over
  samples and weight-sharing positions (``count = N·T``), reduce over samples of the
  position-averaged input (concepts/kronecker.md#weight-sharing-expand-and-reduce).
  Independent of the loss's reduction.
* ``G = Σ g gᵀ`` on the loss's scale: ``g`` are the loss-Hessian square-root columns
  backpropagated to the layer output (``"exact"``), their Monte-Carlo version (``"mc"``)
  or the observed-label output gradients (``"empirical"``); expand sums the outer
  products over positions, reduce sums ``g`` over positions first. For convolutions,
  expand is KFC.

These are curvlinops' ``KFACLinearOperator`` factors with ``separate_weight_and_bias=False``.
They come from a :class:`~curvlab.extraction.KroneckerStatistics` request; a layer's
memory is two small matrices, never per-sample gradients.

This base owns what every Kronecker structure shares — which layers get a Kronecker block
(and the diagonal blocks of every other trainable parameter), the factor statistics, their
sums for distribution, the state — and the closed forms of block-diagonal structures from
each layer's spectrum. The structures are subclasses: :class:`~curvlab.KFAC` (eigen- or
Cholesky-damped blocks), :class:`~curvlab.EKFAC` (K-FAC's eigenbasis with a refitted
diagonal) and :class:`~curvlab.BlockTridiagonalKFAC` (consecutive layers coupled).

**Coverage.** Every trainable parameter is covered by default: layers with a Kronecker rule
(``Linear``, ``ConvNd``, ``Embedding`` — see ``supported_layers``) get a Kronecker block;
every other parameter (normalisation layers, raw ``nn.Parameter``s, recurrent weights unless
``KFAC(recurrent=...)`` splits them into Kronecker blocks per affine map
(:meth:`KroneckerFactored._split_layer`), transposed convolutions, parameters shared between
modules, the projections of ``nn.MultiheadAttention``, which it calls functionally) gets a
diagonal block of the same Fisher type (:class:`~curvlab.curvature.diagonal.DiagonalBlocks`:
the Fisher's diagonal), placed after the Kronecker layers in ``params``. ``strict=True``
refuses such parameters instead; ``coverage()`` tells which parameter sits in which kind of
block. The one approximation: ``KFAC``/``KFC`` take normalisation layers' diagonal from
per-sample gradients where a BatchNorm in train mode couples the samples (``coverage()``
kind :data:`APPROXIMATE_DIAGONAL`; concepts/models.md#rows-samples-and-exactness). A module
registered twice (the same layer twice in an ``nn.Sequential``) is one layer called twice,
not a tied parameter.

**Ignored rows.** The inputs of loss rows equal to ``ignore_index`` do not enter ``A``
where rows map to the layer's samples or positions
(concepts/models.md#rows-the-loss-ignores).
"""

from __future__ import annotations

import abc
import fnmatch
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab import linalg
from curvlab.curvature.base import (
    LOW_RANK_SUM,
    Curvature,
    Declared,
    DecompositionBlock,
    Layer,
    LayerMemory,
    MemoryEstimate,
    RunningCount,
    RunningSum,
    Vector,
    find_layers,
)
from curvlab.curvature.diagonal import DiagonalBlocks
from curvlab.extraction import (
    BatchResult,
    FisherType,
    KroneckerBatch,
    KroneckerStatistics,
    Request,
    check_mc_samples,
)
from curvlab.extraction import layers as layer_rules

LayerSpec = str | nn.Module

#: ``output_factor`` values: per layer, how the output factor ``G`` is kept.
OUTPUT_FACTORS = ("auto", "dense", "structured")
#: ``output_factor="auto"`` gives a layer with at least this many outputs the structured
#: output factor (a dense float32 ``G`` of this size takes 256 MiB, its eigenvectors as
#: much again; concepts/kronecker.md#vocabulary-sized-output-layers).
STRUCTURED_OUTPUT_THRESHOLD = 8192

#: ``coverage()``'s kind of a diagonal block taken from per-sample gradients of samples
#: that a BatchNorm in train mode couples (concepts/models.md#rows-samples-and-exactness).
APPROXIMATE_DIAGONAL = "diagonal (approximate: per-sample, BatchNorm couples the samples)"

#: ``KFAC(tied=...)`` settings for a weight tied between an ``nn.Embedding`` and an
#: ``nn.Linear`` head (concepts/kronecker.md#tied-embedding-and-output-head).
TIED_MODES = ("kronecker", "diagonal")
#: ``coverage()``'s kind of a tied embedding/head weight (and the head's bias) in one joint
#: block ``G_h ⊗ A_h + D_e ⊗ B_e``.
TIED_KRONECKER_SUM = "kronecker sum (tied embedding and head)"
#: ``coverage()``'s kind of a tied embedding/head weight that ``tied="kronecker"`` leaves in
#: a diagonal block because the head's output factor is structured (diagonal plus low rank).
TIED_STRUCTURED_DIAGONAL = (
    "diagonal (tied embedding and head: the head's output factor is structured; "
    "output_factor='dense' for the head gives the Kronecker sum)"
)


class KroneckerFactors(NamedTuple):
    """A layer's factors: the block is ``kron(G, A)`` on the row-major ``[W | b]`` matrix.

    ``A`` is ``[D_in(+1), D_in(+1)]``, or its diagonal ``[D_in]`` where the input factor is
    diagonal (one-hot inputs: ``nn.Embedding`` under expand, in the backends that keep it
    so, concepts/kronecker.md#diagonal-input-factors); ``torch.diag(A)`` gives the matrix.
    """

    A: Tensor  # [D_in(+1), D_in(+1)], or [D_in] when diagonal
    G: Any  # Tensor [D_out, D_out], or linalg.DiagonalPlusLowRank (structured output factor)


class KroneckerFactored(Curvature):
    """Base of the Kronecker-factored backends (not registered; see the module docstring).

    Args:
        model, loss_fn, engine: as for :class:`~curvlab.Curvature`.
        fisher_type: ``"mc"``, ``"exact"`` or ``"empirical"``.
        mc_samples: sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (weight sharing).
        layers, exclude: which modules get blocks (objects, names, or glob patterns over
            names such as ``"blocks.*.attn*"``; a pattern must match a module).
        strict: refuse parameters without a Kronecker block instead of a diagonal block.
        statistics_fraction: factors from this share of each batch.
        separate_bias: weight and bias in separate blocks (no weight–bias cross entries
            in ``A``).
        factor_dtype: the dtype ``A`` and ``G`` are accumulated and kept in (``None``: the
            statistics' own, float32 or float64; e.g. ``torch.float64`` for precision with a
            float32 model, or ``torch.bfloat16`` to halve their memory).

    Subclasses implement the products and solves (``_matvec``, ``_solve``, ``_to_dense``)
    and, for a block-diagonal structure, ``_layer_spectra``.
    """

    #: Restrict Kronecker blocks to these layer types; ``None`` (every shipped backend):
    #: the rule table alone decides (``layers.KRONECKER_RULES``: ``Linear``, ``ConvNd``,
    #: ``Embedding`` and every type registered with ``register_kronecker_rule``).
    supported_layers: tuple[type[nn.Module], ...] | None = None
    #: Whether the extraction also keeps per-sample patches and columns (EKFAC, and the
    #: block-tridiagonal structure's cross moments).
    _keep_raw: bool = False
    #: Whether it also delivers per-row weight gradients where the per-sample ones are not
    #: per-row (EKFAC's exact correction; concepts/models.md#rows-samples-and-exactness).
    _per_row: bool = False
    #: Whether diagonal input factors (``nn.Embedding`` under expand) are kept, solved,
    #: saved and all-reduced as vectors ``[D_in]``; otherwise they are made dense matrices
    #: (structures that need a dense ``A``, e.g. its eigenvectors).
    _diagonal_factors: bool = True
    #: Whether the structure can keep a layer's ``G`` as diagonal plus low rank
    #: (``output_factor="structured"``); otherwise such layers are refused.
    _structured_output: bool = True
    #: How a weight tied between an ``nn.Embedding`` and an ``nn.Linear`` head is covered
    #: (:data:`TIED_MODES`); only a backend that sets it to ``"kronecker"`` (``KFAC``) joins
    #: the pair into one block, every other keeps the tied weight in a diagonal block.
    tied: str = "diagonal"

    #: Per layer ``Σ ā āᵀ`` (divided by the layer's sample count) and ``Σ_b w_b Σ g gᵀ``
    #: (a tensor, or a DiagonalPlusLowRank for a structured output factor), the diagonal
    #: blocks' sums; subclasses add the sums of their structure.
    running_state: ClassVar[tuple[Declared, ...]] = (
        RunningSum(
            "A", "_a_sum", per="a_count", symmetric=True, label="_layer_label", legacy="a_sum"
        ),
        RunningSum(
            "G",
            "_g_sum",
            symmetric=True,
            label="_layer_label",
            legacy="g_sum",
            structured=LOW_RANK_SUM,  # a structured G: d all-reduced, U and s gathered
        ),
        RunningSum(
            "diagonal", "_diagonal_blocks.sums", label="_diagonal_blocks.label", legacy="diagonal"
        ),
        RunningCount("a_count", "_a_count", legacy="a_count"),
    )

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        strict: bool = False,
        engine: str = "auto",
        statistics_fraction: float = 1.0,
        separate_bias: bool = False,
        factor_dtype: torch.dtype | None = None,
        output_factor: str | Mapping[str, str] = "auto",
        output_rank: int = 64,
    ) -> None:
        super().__init__(model, loss_fn, engine=engine)
        owner = type(self).__name__
        self.factor_dtype = check_dtype(factor_dtype, "factor_dtype", owner)
        if isinstance(output_rank, bool) or not isinstance(output_rank, int) or output_rank < 1:
            raise ValueError(f"{owner}: output_rank must be a positive int, got {output_rank!r}.")
        self.output_rank = output_rank
        self._output_choice = output_factor
        if not 0.0 < statistics_fraction <= 1.0:
            raise ValueError(
                f"{owner}: statistics_fraction must lie in (0, 1], got {statistics_fraction}."
            )
        self.fisher_type = FisherType.parse(fisher_type, owner)
        check_mc_samples(mc_samples, owner)
        if kfac_approx not in layer_rules.KFAC_APPROXES:
            raise ValueError(
                f"{owner}: unknown kfac_approx {kfac_approx!r}; choose one of "
                f"{layer_rules.KFAC_APPROXES}."
            )
        self.separate_bias = bool(separate_bias)
        self.statistics_fraction = float(statistics_fraction)
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self._layer_choice = (layers, exclude)
        self.strict = strict
        self._a_sum: list[Tensor] | None = None
        self._g_sum: list[Any] | None = None  # per layer a Tensor or DiagonalPlusLowRank
        self._diagonal_blocks: DiagonalBlocks | None = None
        kronecker = self._select_layers(self.model)
        self._a_count = [0] * len(kronecker)
        self.layers = kronecker  # the requests name the layers' modules
        self._cover(kronecker, self._requests(), other_layers=self._diag().layers)

    # --- layer selection --------------------------------------------------------------

    def _select_layers(self, model: nn.Module) -> list[Layer]:
        owner = type(self).__name__
        include, exclude = self._layer_choice
        chosen = _resolve(model, include, "layers", owner) if include is not None else None
        skipped = _resolve(model, exclude, "exclude", owner) if exclude is not None else set()
        kronecker, diagonal = [], []
        # a parameter is tied when several modules own it; a module registered twice (the
        # same layer used twice in an nn.Sequential) is one layer called twice
        owners: dict[int, list[tuple[str, nn.Module]]] = {}  # per parameter, its modules
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append((name, module))
        self._tied = {key for key, found in owners.items() if len(found) > 1}
        all_layers = find_layers(model)
        pairs = self._tied_pairs(owners, all_layers, chosen, skipped)
        joined: set[int] = set()  # modules of pairs already placed
        #: per joint layer's index (a head whose weight is tied to an embedding), the
        #: embedding's layer (no parameters: its statistics join the head's block)
        self._partners: dict[int, Layer] = {}
        partners_by_head: dict[int, Layer] = {}  # the same by the head module's id
        for layer in all_layers:
            key = id(layer.module)
            if key in skipped or (chosen is not None and key not in chosen):
                continue
            pair = pairs.get(key)
            if pair is not None:  # one joint block at the first of the two modules
                joint, emb_layer = pair
                if id(joint.module) not in joined:
                    joined.update({id(joint.module), id(emb_layer.module)})
                    kronecker.append(joint)
                    partners_by_head[id(joint.module)] = emb_layer
                continue
            split = self._split_layer(layer)
            if split is not None:  # one Kronecker block per part (a recurrent module's maps)
                kronecker.extend(split)
                continue
            reason = self._no_kronecker_reason(model, layer)
            if reason is None:
                kronecker.append(layer)
            elif self.strict:
                raise ValueError(
                    f"{owner}: module '{layer.name}' ({type(layer.module).__name__}) has "
                    f"trainable parameters without a Kronecker block: {reason}. Pass "
                    f"exclude=['{layer.name}'] to leave it out, or strict=False to give it "
                    "a diagonal block."
                )
            else:
                diagonal.append(layer)
        if not kronecker and not diagonal:
            raise ValueError(f"{owner}: no layer selected (check layers=/exclude=).")
        self._structured = self._resolve_output_factors(model, kronecker)
        self._tied_structured: set[int] = set()  # tied weights left diagonal (structured G)
        for k in reversed(range(len(kronecker))):
            partner = partners_by_head.get(id(kronecker[k].module))
            if partner is None:
                continue
            if self._structured[k]:  # no Kronecker sum with a structured G: diagonal blocks
                joint = kronecker.pop(k)
                self._structured.pop(k)
                self._tied_structured.update(id(p) for p in joint.params)
                for layer in all_layers:
                    if layer.module is joint.module or layer.module is partner.module:
                        diagonal.append(layer)
                del partners_by_head[id(joint.module)]
        if self._tied_structured:  # the diagonal blocks in registration order
            order = {id(layer.module): i for i, layer in enumerate(all_layers)}
            diagonal.sort(key=lambda layer: order.get(id(layer.module), len(order)))
        self._partners = {
            k: partners_by_head[id(layer.module)]
            for k, layer in enumerate(kronecker)
            if id(layer.module) in partners_by_head
        }
        self._diagonal_blocks = DiagonalBlocks(
            diagonal,
            self.fisher_type,
            self.mc_samples,
            owner,
            at_layers=True,
            tied=frozenset(self._tied),
            coupled=self._per_row,
        )
        return kronecker

    def _tied_pairs(
        self,
        owners: Mapping[int, list[tuple[str, nn.Module]]],
        all_layers: list[Layer],
        chosen: set[int] | None,
        skipped: set[int],
    ) -> dict[int, tuple[Layer, Layer]]:
        """With ``tied="kronecker"``: per module of each weight tied between exactly one
        ``nn.Embedding`` (under expand, its input factor diagonal) and one ``nn.Linear``
        head of the same shape, ``(the joint layer, the embedding's layer)``. The joint
        layer is the head's ``[W | b]`` block (the weight named as ``find_layers`` names it,
        the head's trainable bias); the embedding's layer carries no parameter, only its
        statistics. Any other sharing keeps a diagonal block. ``owners``: per parameter
        ``id``, the ``(name, module)`` pairs that register it; ``all_layers``: the model's
        ``find_layers``."""
        if self.tied != "kronecker":
            return {}
        names = {id(p): n for layer in all_layers for p, n in zip(layer.params, layer.param_names)}
        pairs: dict[int, tuple[Layer, Layer]] = {}
        for key in self._tied:
            found = owners.get(key, [])
            if len(found) != 2:
                continue
            embs = [(n, m) for n, m in found if type(m) is nn.Embedding]
            heads = [(n, m) for n, m in found if type(m) is nn.Linear]
            if len(embs) != 1 or len(heads) != 1:
                continue
            (emb_name, emb), (head_name, head) = embs[0], heads[0]
            weight = head.weight
            if (
                not isinstance(weight, nn.Parameter)
                or emb.weight is not weight
                or id(weight) != key
                or not weight.requires_grad
            ):
                continue
            if any(
                id(m) in skipped or (chosen is not None and id(m) not in chosen)
                for m in (emb, head)
            ):
                continue
            if not layer_rules.diagonal_input(emb, self.kfac_approx):
                continue
            bias = head.bias if layer_rules.has_trainable_bias(head) else None
            if bias is not None and id(bias) in self._tied:
                continue
            try:
                for module in (emb, head):
                    rule = layer_rules.rule_for(module)
                    assert rule is not None
                    rule.check(module)
            except ValueError:
                continue
            prefix = f"{head_name}." if head_name else ""
            joint = Layer(
                name=head_name,
                module=head,
                params=(weight,) if bias is None else (weight, bias),
                param_names=(names[key],) if bias is None else (names[key], prefix + "bias"),
            )
            emb_layer = Layer(name=emb_name, module=emb, params=(), param_names=())
            pairs[id(head)] = pairs[id(emb)] = (joint, emb_layer)
        return pairs

    def _split_layer(self, layer: Layer) -> list[Layer] | None:
        """Layers that stand for ``layer``'s parameters, one Kronecker block each, or
        ``None`` (the default) to treat ``layer`` as one layer."""
        return None

    def _no_kronecker_reason(self, model: nn.Module, layer: Layer) -> str | None:
        """Why ``layer`` gets no Kronecker block, or ``None`` when it gets one."""
        module = layer.module
        for name, parent in model.named_modules():
            if isinstance(parent, nn.MultiheadAttention) and layer.name.startswith(name + "."):
                return (
                    "nn.MultiheadAttention calls its projections functionally, so their "
                    "outputs' gradients cannot be observed"
                )
        rule = layer_rules.rule_for(module)
        allowed = self.supported_layers
        if rule is None or (allowed is not None and not isinstance(module, allowed)):
            types = allowed if allowed is not None else tuple(layer_rules.KRONECKER_RULES)
            supported = ", ".join(cls.__name__ for cls in types)
            return f"{type(self).__name__} has Kronecker rules for {supported} only"
        rule.check(module)
        weight = getattr(module, "weight", None)
        if weight is None or not any(p is weight for p in layer.params):
            return "its weight is frozen or shared with another module (tied)"
        if any(id(p) in self._tied for p in layer.params):
            return "a parameter of it is shared with another module (tied weights)"
        bias = getattr(module, "bias", None)
        if layer_rules.has_trainable_bias(module) and not any(p is bias for p in layer.params):
            return "its bias is shared with another module (tied)"
        return None

    def _diag(self) -> DiagonalBlocks:
        assert self._diagonal_blocks is not None
        return self._diagonal_blocks

    def _block_kind(self, layer: Layer) -> str:
        for k, own in enumerate(self.layers):
            if layer is own:
                return TIED_KRONECKER_SUM if k in self._partners else "kronecker"
        if any(id(p) in self._tied_structured for p in layer.params):
            return TIED_STRUCTURED_DIAGONAL
        if self._per_sample_diagonal(layer):
            return APPROXIMATE_DIAGONAL
        return "diagonal"

    def _per_sample_diagonal(self, layer: Layer) -> bool:
        """Whether ``layer``'s diagonal block may come from per-sample gradients of coupled
        samples (an approximation, concepts/models.md#rows-samples-and-exactness): a
        normalisation layer served at the layer by a backend that does not backpropagate
        each row on its own where samples are coupled, in a model with a BatchNorm that
        normalises with batch statistics (in train mode, or without running statistics)."""
        if self._per_row or not any(id(p) in self._diag()._local for p in layer.params):
            return False
        return any(
            isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)
            for m in self.model.modules()
        )

    # --- statistics ---------------------------------------------------------------------

    def _requests(self) -> list[Request]:
        requests: list[Request] = []
        if self.layers:
            requests.append(self._kronecker_request())
        if len(self._diag()):
            requests.extend(self._diag().requests)
        return requests

    def _kronecker_request(self) -> KroneckerStatistics:
        return KroneckerStatistics(
            self.fisher_type,
            tuple(layer.module for layer in self.layers) + self._partner_modules(),
            kfac_approx=self.kfac_approx,
            mc_samples=self.mc_samples,
            keep_raw=self._keep_raw,
            sample_fraction=self.statistics_fraction,
            per_row=self._per_row,
            low_rank_output=tuple(
                layer.module for layer, s in zip(self.layers, self._structured) if s
            ),
        )

    def _partner_modules(self) -> tuple[nn.Module, ...]:
        """The embeddings tied to a joint layer's head (their statistics join its block)."""
        return tuple(self._partners[k].module for k in sorted(self._partners))

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        if len(self._diag()):
            self._diag().accumulate(result, weight)
        if self.layers:
            self._accumulate_layers(self._layer_batches(result), weight)

    def _accumulate_layers(self, batches: list[KroneckerBatch], weight: float) -> None:
        """Add one batch's per-layer statistics (subclasses add what their structure needs)."""
        self._add_factors(batches, weight)

    def _layer_batches(self, result: BatchResult) -> list[KroneckerBatch]:
        """Each layer's statistics of the batch; a layer the forward pass did not call (an
        auxiliary head) adds nothing, as ``torch.optim`` skips a parameter without
        gradient (backends that keep per-sample statistics raise, naming it)."""
        request = self._kronecker_request()
        return [self._layer_batch(result, request, layer, k) for k, layer in enumerate(self.layers)]

    def _layer_batch(
        self, result: BatchResult, request: KroneckerStatistics, layer: Layer, k: int
    ) -> KroneckerBatch:
        """Layer ``k``'s statistics of the batch (see :meth:`_layer_batches`)."""
        found = result.kronecker.get(request.key, {}).get(id(layer.module))
        if found is None and not request.keep_raw:
            found = self._unused_layer_batch(k)
        if found is None:
            found = result.kronecker_batch(request, layer.module, layer.name)  # raises
        return found

    def _unused_layer_batch(self, k: int) -> KroneckerBatch:
        """Zero statistics of layer ``k`` when the batch's forward pass did not call it."""
        return _unused_layer_batch(self.layers[k].module, self.kfac_approx, self._structured[k])

    def _add_factors(self, batches: list[KroneckerBatch], weight: float) -> None:
        if self._a_sum is None or self._g_sum is None:
            # Adopt the first batch's tensors without copying. A may be shared with other
            # backends of the same extract() and loaded statistics belong to the caller, so
            # nothing is modified in place until owned (copy-on-write); G is a fresh product.
            self._a_sum = [
                self._a_layout(k, self._in_factor_dtype(b.a_sum)) for k, b in enumerate(batches)
            ]
            self._g_sum = [
                self._structured_update(None, b, weight)
                if self._structured[k]
                else self._in_factor_dtype(b.g) * weight
                for k, b in enumerate(batches)
            ]
            self._a_count = [b.count for b in batches]
            self._sums_owned = False
            return
        for k, batch in enumerate(batches):
            if self._structured[k]:  # a fresh DiagonalPlusLowRank: nothing shared
                self._g_sum[k] = self._structured_update(self._g_sum[k], batch, weight)
                a = self._a_layout(k, self._in_factor_dtype(batch.a_sum))
                if self._sums_owned:
                    self._a_sum[k].add_(a)
                else:
                    self._a_sum[k] = self._a_sum[k] + a
                self._a_count[k] += batch.count
                continue
            a, g = (
                self._a_layout(k, self._in_factor_dtype(batch.a_sum)),
                self._in_factor_dtype(batch.g),
            )
            if self._sums_owned:
                self._a_sum[k].add_(a)
                self._g_sum[k].add_(g, alpha=weight)
            else:
                self._a_sum[k] = self._a_sum[k] + a
                self._g_sum[k] = self._g_sum[k] + weight * g
            self._a_count[k] += batch.count
        self._sums_owned = True

    def _in_factor_dtype(self, t: Tensor) -> Tensor:
        return t if self.factor_dtype is None else t.to(self.factor_dtype)

    def _structured_update(
        self, G: linalg.DiagonalPlusLowRank | None, batch: KroneckerBatch, weight: float
    ) -> linalg.DiagonalPlusLowRank:
        """``G + weight · (the batch's factor)``, compressed to ``output_rank``."""
        assert batch.g_low_rank is not None
        d, cols, sign = batch.g_low_rank
        d, cols = self._in_factor_dtype(d), self._in_factor_dtype(cols)
        if G is not None:
            G = G._replace(d=G.d + weight * d)
        else:
            zero = d.new_zeros
            G = linalg.DiagonalPlusLowRank(
                weight * d, zero(d.shape[0], self.output_rank), zero(self.output_rank)
            )
        return linalg.low_rank_update(G, cols, sign * weight, self.output_rank)

    # --- output factors ------------------------------------------------------------------

    def _resolve_output_factors(self, model: nn.Module, layers: list[Layer]) -> list[bool]:
        """Per Kronecker layer, whether its ``G`` is structured (see ``output_factor``)."""
        owner = type(self).__name__
        choice = self._output_choice
        if isinstance(choice, str):
            per_layer: dict[int, str] = {}
            default = choice
        elif isinstance(choice, Mapping):
            default, per_layer = "auto", {}
            for spec, mode in choice.items():
                _check_output_mode(mode, owner)
                ids = _resolve(model, [spec], "output_factor", owner)
                kronecker = {id(layer.module) for layer in layers}
                for key in ids:
                    if key not in kronecker:
                        name = next(n for n, m in model.named_modules() if id(m) == key)
                        raise ValueError(
                            f"{owner}: output_factor names module '{name}', which has no "
                            "Kronecker block (not a layer of the rule table, excluded, or its "
                            "weight is tied to another module's and it has a diagonal block, "
                            "which is already O(parameters)); coverage() lists the blocks."
                        )
                    per_layer[key] = mode
        else:
            raise ValueError(
                f"{owner}: output_factor must be one of {OUTPUT_FACTORS} or a dict from "
                f"module names to them, got {choice!r}."
            )
        _check_output_mode(default, owner)
        structured = []
        for layer in layers:
            label = f"layer '{layer.name}' ({type(layer.module).__name__})"
            mode = per_layer.get(id(layer.module), default)
            d_out, _ = layer_rules.weight_matrix_shape(layer.module)
            big = d_out >= STRUCTURED_OUTPUT_THRESHOLD
            wants = mode == "structured" or (mode == "auto" and big)
            if wants and not self._structured_output:
                why = (
                    "output_factor='structured'"
                    if mode == "structured"
                    else (
                        f"{d_out} outputs (≥ {STRUCTURED_OUTPUT_THRESHOLD}, where "
                        "output_factor='auto' picks a structured output factor)"
                    )
                )
                raise ValueError(
                    f"{owner}: {label} has {why}, but {owner} needs a dense "
                    "G (its eigenvectors). Pass output_factor={'" + layer.name + "': 'dense'} "
                    f"to keep a dense G ({4 * d_out * d_out / 2**30:.2f} GiB in float32), "
                    f"exclude=['{layer.name}'], or use KFAC, which keeps the structured factor."
                )
            if wants and self.statistics_fraction < 1.0:
                raise ValueError(
                    f"{owner}: {label} has a structured output factor, which "
                    "takes the whole batch; statistics_fraction must be 1."
                )
            structured.append(wants)
        return structured

    def _is_structured(self, k: int) -> bool:
        """Whether layer ``k``'s ``G`` is kept as diagonal plus low rank."""
        return self._structured[k]

    def _is_diagonal_factor(self, k: int) -> bool:
        """Whether layer ``k``'s input factor is kept as its diagonal ``[D_in]``."""
        return self._diagonal_factors and layer_rules.diagonal_input(
            self.layers[k].module, self.kfac_approx
        )

    def _a_layout(self, k: int, a: Tensor) -> Tensor:
        """``a`` (a sum of layer ``k``'s input factor, as a matrix or a diagonal) in the
        layout this backend keeps: the diagonal ``[D_in]`` where
        :meth:`_is_diagonal_factor`, else a matrix (an old checkpoint's dense diagonal
        factor is reduced to its diagonal, which holds all of it)."""
        if self._is_diagonal_factor(k):
            return torch.diagonal(a) if a.ndim == 2 else a
        return torch.diag(a) if a.ndim == 1 else a

    def factors(self) -> list[KroneckerFactors]:
        """Per layer ``(A, G)``, normalised as described in the module docstring."""
        self._check_ready("factors")
        return [self._factor(k) for k in range(len(self.layers))]

    def diagonal_blocks(self) -> dict[str, Tensor]:
        """The diagonal blocks of the parameters outside the Kronecker layers (those
        ``coverage()`` calls ``"diagonal"`` or :data:`APPROXIMATE_DIAGONAL`; after the
        Kronecker layers in ``params``): parameter name → the block's diagonal, shaped like
        the parameter, on the scale of :meth:`factors`' ``G`` (the Fisher's diagonal of
        this backend's ``fisher_type``). ``{}`` when every parameter has a Kronecker block.

        With :meth:`factors` (per entry of ``layers``) it is the whole curvature: what an
        integration needs to rebuild it in another library's format.
        """
        self._check_ready("diagonal_blocks")
        if not len(self._diag()):
            return {}
        blocks = self._diag()
        return dict(zip(blocks.names, blocks.diagonals(self._normalizer)))

    def _factor(self, k: int) -> KroneckerFactors:
        assert self._a_sum is not None and self._g_sum is not None
        a = self._a_sum[k] / max(self._a_count[k], 1)  # a layer never called: zero
        if (
            self.separate_bias
            and a.ndim == 2
            and layer_rules.has_trainable_bias(self.layers[k].module)
        ):
            cross = torch.ones_like(a, dtype=torch.bool)
            cross[:-1, :-1] = False
            cross[-1, -1] = False
            a = a.masked_fill(cross, 0.0)  # separate blocks: no weight–bias cross terms
        g = self._g_sum[k]
        if isinstance(g, linalg.DiagonalPlusLowRank):
            return KroneckerFactors(A=a, G=g.scaled(1.0 / self._normalizer))
        return KroneckerFactors(A=a, G=g / self._normalizer)

    # --- memory ------------------------------------------------------------------------

    def _memory_estimate(self) -> MemoryEstimate:
        layers = {self._layer_label(k): self._layer_memory(k) for k in range(len(self.layers))}
        layers.update(self._diag().memory())
        return MemoryEstimate(layers)

    def _factor_itemsize(self, k: int) -> int:
        """Bytes per entry of layer ``k``'s factors (``factor_dtype``, else the statistics')."""
        if self.factor_dtype is not None:
            return self.factor_dtype.itemsize
        weight: Tensor = self.layers[k].module.weight  # type: ignore[assignment]
        return layer_rules.statistics_dtype(weight.detach()[:0]).element_size()

    def _factor_numel(self, k: int) -> tuple[int, int]:
        """Entries of layer ``k``'s ``(A, G)`` sums as kept (a diagonal ``A``: ``D_in``; a
        structured ``G``: ``d``, ``U`` and ``s``)."""
        d_out, d_in = layer_rules.weight_matrix_shape(self.layers[k].module)
        r = self.output_rank
        g = d_out * (1 + r) + r if self._structured[k] else d_out * d_out
        return (d_in if self._is_diagonal_factor(k) else d_in * d_in), g

    def _layer_memory(self, k: int) -> LayerMemory:
        """Layer ``k``'s bytes: the factor sums; subclasses add what they keep."""
        return LayerMemory(sum(self._factor_numel(k)) * self._factor_itemsize(k), 0)

    # --- products ----------------------------------------------------------------------

    def _per_layer(self, v: Vector) -> list[tuple[Layer, list[Tensor]]]:
        """The Kronecker layers' parts of ``v`` (the diagonal tail: :meth:`_tail`)."""
        out, start = [], 0
        for layer in self.layers:
            stop = start + len(layer.params)
            out.append((layer, v[start:stop]))
            start = stop
        return out

    def _kronecker_block(self, k: int) -> Tensor:
        """Layer ``k``'s ``kron(G, A)`` in the ``[vec(W), b]`` order (dense; small models)."""
        f = self._factor(k)
        perm = layer_rules.parameter_order(self.layers[k].module)
        a = torch.diag(f.A) if f.A.ndim == 1 else f.A
        g = f.G.to_dense() if isinstance(f.G, linalg.DiagonalPlusLowRank) else f.G
        return linalg.kron_dense(g, a)[perm][:, perm]

    def _tail(self, v: Vector) -> Vector:
        """The entries of ``v`` for the diagonal blocks (after the Kronecker layers)."""
        return list(v[len(v) - len(self._diag()) :])

    def _tail_diagonal(self) -> list[Tensor]:
        if not len(self._diag()):
            return []
        return [d.reshape(-1) for d in self._diag().diagonals(self._normalizer)]

    def _layer_label(self, k: int) -> str:
        layer = self.layers[k]
        return f"layer '{layer.name}' ({type(layer.module).__name__})"

    # --- loaded state ------------------------------------------------------------------

    def _check_loaded_sums(self) -> None:
        """Loaded factor sums must fit this model's layers and output-factor choices; an
        input factor is brought into the layout this backend keeps (:meth:`_a_layout`)."""
        self._diag().check_loaded()
        a_sum, g_sum = self._a_sum, self._g_sum
        if a_sum is None or g_sum is None:
            return
        expected = [layer_rules.weight_matrix_shape(layer.module) for layer in self.layers]
        got = [(_factor_size(g), a.shape[0]) for a, g in zip(a_sum, g_sum)]
        if got != expected:
            raise ValueError(
                f"{type(self).__name__}: factor sizes {got} do not match this model's "
                f"layers {expected}."
            )
        for k, g in enumerate(g_sum):
            if self._structured[k] != isinstance(g, linalg.DiagonalPlusLowRank):
                kind = "structured" if self._structured[k] else "dense"
                raise ValueError(
                    f"{type(self).__name__}: {self._layer_label(k)} keeps a {kind} "
                    "output factor, the loaded one is not; construct the backend with "
                    "the output_factor it was saved with."
                )
        self._a_sum = [self._a_layout(k, a) for k, a in enumerate(a_sum)]


class BlockDiagonalKronecker(KroneckerFactored):
    """Kronecker-factored backends whose layers' blocks are independent (``KFAC``, ``EKFAC``).

    A subclass says what one layer's block is — :meth:`_matvec_layer`, :meth:`_solve_layer`,
    :meth:`_dense_layer` and :meth:`_layer_spectra` — and gets the whole operator: products
    and solves block by block (the diagonal blocks last), one decomposition block per layer,
    the dense matrix, ``logdet`` and the eigenvalues from the layers' spectra.
    """

    @abc.abstractmethod
    def _matvec_layer(self, k: int, parts: list[Tensor]) -> list[Tensor]:
        """Layer ``k``'s block times ``parts`` (its parameters' entries)."""

    @abc.abstractmethod
    def _solve_layer(self, k: int, parts: list[Tensor], damping: float) -> list[Tensor]:
        """Layer ``k``'s damped block solved against ``parts``."""

    @abc.abstractmethod
    def _dense_layer(self, k: int) -> Tensor:
        """Layer ``k``'s block as a matrix in the ``[vec(W), b]`` order (small models)."""

    @abc.abstractmethod
    def _layer_spectra(self) -> list[Tensor]:
        """Per Kronecker layer, the block's eigenvalues ``[D_out, D_in]``."""

    def _matvec(self, v: Vector) -> Vector:
        result: Vector = []
        for k, (_, parts) in enumerate(self._per_layer(v)):
            result.extend(self._matvec_layer(k, parts))
        if len(self._diag()):
            result.extend(self._diag().matvec(self._tail(v), self._normalizer))
        return result

    def _solve(self, v: Vector, damping: float) -> Vector:
        result: Vector = []
        for k, (_, parts) in enumerate(self._per_layer(v)):
            result.extend(self._solve_layer(k, parts, damping))
        if len(self._diag()):
            result.extend(self._diag().solve(self._tail(v), damping, self._normalizer))
        return result

    def _solve_block(self, index: int, v: Vector, damping: float) -> Vector:
        if self._is_diagonal_block(index):
            return self._diag().solve(v, damping, self._normalizer)
        return self._solve_layer(index, v, damping)

    def _to_dense(self) -> Tensor:
        blocks = [self._dense_layer(k) for k in range(len(self.layers))]
        if len(self._diag()):
            blocks.append(self._diag().to_dense(self._normalizer))
        return torch.block_diag(*blocks)

    # closed forms from the layers' spectra (concepts/kronecker.md#kronecker-identities)

    def _spectrum(self) -> Tensor:
        return torch.cat([s.reshape(-1) for s in self._layer_spectra()] + self._tail_diagonal())

    def _logdet(self, damping: float) -> Tensor:
        return torch.log(self._spectrum().double() + damping).sum()

    def _eigenvalues(self, k: int | None) -> Tensor:
        return torch.sort(self._spectrum(), descending=True).values

    def _decomposition_blocks(self) -> list[DecompositionBlock]:
        """One block per Kronecker layer, then one for all diagonal blocks."""
        sizes = [layer_rules.weight_matrix_shape(layer.module) for layer in self.layers]
        blocks, start = [], 0
        for k, (layer, (d_out, d_in)) in enumerate(zip(self.layers, sizes)):
            stop = start + len(layer.params)
            blocks.append(
                DecompositionBlock(
                    index=k,
                    name=self._layer_label(k),
                    param_indices=tuple(range(start, stop)),
                    cost=self._layer_cost(d_out, d_in),
                )
            )
            start = stop
        if len(self._diag()):
            blocks.append(
                DecompositionBlock(
                    index=len(blocks),
                    name=f"{type(self).__name__} diagonal blocks",
                    param_indices=tuple(range(start, len(self.params))),
                    cost=float(sum(p.numel() for p in self._diag().params)),
                )
            )
        return blocks

    def _is_diagonal_block(self, index: int) -> bool:
        return index == len(self.layers)

    def _layer_cost(self, d_out: int, d_in: int) -> float:
        """Eigen- or Cholesky decompositions of ``G`` and ``A``: ``O(d_out³ + d_in³)``."""
        return float(d_out**3 + d_in**3)


#: Dtypes a factor or a decomposition may be kept in.
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtype(dtype: torch.dtype | None, arg: str, owner: str) -> torch.dtype | None:
    """``dtype`` if it is ``None`` or a floating dtype (clear error otherwise)."""
    if dtype is not None and dtype not in FLOATING_DTYPES:
        raise ValueError(
            f"{owner}: {arg} must be one of {[str(d) for d in FLOATING_DTYPES]} or None, "
            f"got {dtype!r}."
        )
    return dtype


def _resolve(model: nn.Module, specs: Sequence[LayerSpec], arg: str, owner: str) -> set[int]:
    by_name = dict(model.named_modules())
    members = {id(m) for m in by_name.values()}
    ids: set[int] = set()
    for spec in specs:
        if isinstance(spec, str) and spec not in by_name and any(c in spec for c in "*?["):
            # a glob over module names ("blocks.*.attn", "*norm*"); it must match something
            matched = [m for name, m in by_name.items() if name and fnmatch.fnmatchcase(name, spec)]
            if not matched:
                raise ValueError(
                    f"{owner}: {arg} pattern {spec!r} matches no module; modules with "
                    f"parameters: {[layer.name for layer in find_layers(model)]}."
                )
            ids.update(id(m) for m in matched)
        elif isinstance(spec, str):
            if spec not in by_name:
                raise ValueError(
                    f"{owner}: {arg} names unknown module {spec!r}; modules with parameters: "
                    f"{[layer.name for layer in find_layers(model)]}."
                )
            ids.add(id(by_name[spec]))
        elif isinstance(spec, nn.Module) and id(spec) in members:
            ids.add(id(spec))
        else:
            raise ValueError(f"{owner}: {arg} entry {spec!r} is not a module of the model.")
    return ids


def _as_matrix(layer: Layer, parts: list[Tensor]) -> Tensor:
    bias = parts[1] if len(parts) > 1 else None
    return layer_rules.to_matrix(layer.module, parts[0], bias)


def _check_output_mode(mode: object, owner: str) -> None:
    if mode not in OUTPUT_FACTORS:
        raise ValueError(
            f"{owner}: unknown output_factor {mode!r}; choose one of {OUTPUT_FACTORS}."
        )


def _factor_size(g: Any) -> int:
    return g.size if isinstance(g, linalg.DiagonalPlusLowRank) else int(g.shape[0])


def _unused_layer_batch(module: nn.Module, kfac_approx: str, structured: bool) -> KroneckerBatch:
    """Zero statistics (no samples) of a layer the batch's forward pass did not call."""
    d_out, d_in = layer_rules.weight_matrix_shape(module)
    weight: Tensor = module.weight  # type: ignore[assignment]
    dtype = layer_rules.statistics_dtype(weight.detach()[:0]).dtype
    zeros = functools.partial(torch.zeros, dtype=dtype, device=weight.device)
    a_shape = (d_in,) if layer_rules.diagonal_input(module, kfac_approx) else (d_in, d_in)
    if structured:  # never a [D_out, D_out] matrix
        low = (zeros(d_out), zeros(d_out, 0), 1.0)
        return KroneckerBatch(a_sum=zeros(*a_shape), count=0, g=zeros(0, 0), g_low_rank=low)
    return KroneckerBatch(a_sum=zeros(*a_shape), count=0, g=zeros(d_out, d_out))
