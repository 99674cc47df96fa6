"""ablab's engine vs the strongest hand-written PyTorch peer, the same models, in one process.

The peer is what a user who knows ``torch.func`` writes to train many seeds at once: every
parameter stacked over seeds, Keras-equivalent initialisation (glorot_uniform kernels, zero
biases, BN gamma 1 / beta 0 / moving mean 0 / moving variance 1: the same distributions as
ablab's, not the same values), Keras' Adam (lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-7,
Keras' update formula, hand-written on the stacked tensors), Keras' BatchNormalization
(batch statistics in training, biased variance, moving mean / variance with momentum 0.99,
eps 1e-3, the moving statistics for validation), the same rows, batch size, epochs and data
order (``shuffle = false`` on both sides: every seed sees the rows in file order, the last
partial batch kept, as ``fit`` feeds them), float32. Two peer variants, both timed:
  * ``stacked``: a hand-stacked forward -- the first weight layer is one shared-input GEMM
    (``x @ W`` with W laid out (in, seeds*out)) or one conv2d with seeds*filters output
    channels, later layers ``baddbmm`` / grouped conv2d -- and one ``backward`` of the sum of
    the per-seed losses (seeds are independent, so that is every seed's own gradient);
  * ``vmap``: the ``torch.func`` model-ensemble recipe -- one per-seed ``nn.Module``,
    ``functional_call`` + ``vmap(grad_and_value(...))`` over the stacked parameters.
Each variant is a candidate at ``torch.set_num_threads(1)``, at all cores, and with its seeds
cut into one group per core trained at once in Python threads, 1 torch thread each (``@1x2``:
torch releases the GIL in its kernels; the counterpart of ablab's concurrent chunk calls).
Every candidate first runs once for 1 epoch (warm-up and selection); those slower than
1.5x the fastest are dropped (except the fastest at 1 torch thread, always kept), the rest
are timed in every round; the fastest by median is the case's "best peer". The peer
evaluates the validation rows in one pass per epoch (row-wise in inference mode: the same
mean loss as Keras' batched evaluate); its initialisation is inside its timed run, as
ablab's is inside the program.

ablab's side is the program `ablab run` runs: ``build_program`` (probes off), the seeds cut
into chunks by the memory budget, the local executor with ``default_workers()`` chunk
calls at once; compiled and warmed up (first call) before timing, compile and warm-up
reported apart. runs/s = seeds trained per second, training time only. Each round times
ablab, then every peer candidate (A/B/A/B: a shared machine's drift hits both alike);
ratio = ablab runs/s / best peer's runs/s per round, median over rounds.

Cases (``--case``; ``--seeds`` overrides the seed counts):
  * ``ae_plain`` / ``ae_bn``: the seed study (examples/bn_yes_or_no.toml: 12-8-12 linear
    autoencoder, BN after the first Dense in ``bn``; MSE, 20 epochs, batch 32, validation
    split 0.1 of 100 N(0,1) rows), 10,000 seeds;
  * ``digits_mlp32`` / ``_mlp128`` / ``_mlp512`` / ``digits_bn128``: scikit-learn digits
    (pixels / 16, file order, 1,437 train / 360 validation rows), 64-H-10 MLP, relu hidden
    (``bn128``: Dense(128) -> BN -> relu), sparse categorical CE from logits, batch 64,
    5 epochs, 200 seeds;
  * ``cnn_none`` / ``cnn_bn``: examples/digits_cnn.toml's layers and data (rows permuted
    once, standardized; Conv2D(8, 3, same) -> [BN] -> relu -> MaxPool(2) -> Dense(10);
    accuracy as a metric on both sides), 3 epochs instead of 10, 50 seeds.

GFLOP/s counts the dense / conv layers' multiply-adds per row (P): ~6 P FLOPs per training
row (forward + both backward products) and 2 P per validation row, per epoch, per seed;
"% sgemm" is that rate over a float32 ``torch.mm`` of 2048 x 2048 matrices timed in the
same run with all cores, at the start and at the end, the better of the two (the 1-thread
figures are printed too).

Sanity: the mean final val_loss over seeds of ablab and of the best peer must agree within
5 % or 3 standard errors (flagged MISMATCH otherwise); and the peer, started from ablab's
own initial weights for 8 seeds, must reproduce ablab's per-seed final val_loss
(``exact`` = the largest relative difference; float32 summation order only).

The last line printed is JSON: {"sgemm_gflops": {"1": .., "all": ..}, "cpu", "cases": {name:
{"seeds", "epochs", "ablab_runs_per_s", "peer_runs_per_s", "ratio", "best_peer",
"ablab_gflops", "peer_gflops", "ablab_pct_sgemm", "peer_pct_sgemm", "val_loss_ablab",
"val_loss_peer", "val_loss_agree", "exact_max_rel", "compile_s", "ablab_warmup_s",
"selection_1epoch_s": {candidate: s}, "candidates": {candidate: runs/s}, ...}}}.
Usage: python bench/peers.py [--case NAME ...] [--rounds 3] [--seeds N] [--threads 1,2]
       [--peers stacked,vmap] [--split 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram
from ablab.engine.sizing import chunk_size_alone, default_workers, seed_chunks
from ablab.execution.env import cpu_model
from ablab.execution.executors import Cell, LocalExecutor
from ablab.study.loading import study_from_dict
from ablab.study.schema import Study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXACT_SEEDS = 8
"""Seeds the peer trains from ablab's own initial weights (the exact check)."""
AGREE_PCT = 5.0
KEEP = 1.5
"""Peer candidates slower than this x the fastest in the 1-epoch selection run are not timed
further."""
BN_MOMENTUM, BN_EPS = 0.99, 1e-3
ADAM_LR, ADAM_B1, ADAM_B2, ADAM_EPS = 1e-3, 0.9, 0.999, 1e-7

Params = dict[str, torch.Tensor]


# -- the cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One variant of one study, and how many seeds it trains by default."""

    name: str
    study: Study
    variant: str
    seeds: int


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def _digits_npz(folder: Path) -> None:
    """scikit-learn's digits as ``digits16.npz``: x = pixels / 16.0, y = class (rows, 1), in
    the file's order (fit's split then takes the last 360 rows for validation)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(folder / "digits16.npz", x=(x / 16.0).astype(np.float32), y=y.reshape(-1, 1))


def build_cases(data_dir: Path) -> list[Case]:
    """Every case, in the order they run."""
    ae = _toml("bn_yes_or_no.toml")
    ae.pop("checks", None)
    ae_study = study_from_dict(ae, source="bn_yes_or_no.toml", root=str(EXAMPLES))

    _digits_npz(data_dir)
    ce = {"name": "sparse_categorical_crossentropy", "from_logits": True}
    mlp = {
        "name": "digits_mlp_peers",
        "data": {"path": "digits16.npz", "x_key": "x", "target": "y"},
        "train": {
            "optimizer": "adam",
            "loss": ce,
            "epochs": 5,
            "batch_size": 64,
            "validation_split": 0.2,
            "shuffle": False,
        },
        "variants": {
            "baseline": "mlp32",
            **{
                f"mlp{h}": {
                    "layers": [
                        {"layer": "Dense", "units": h, "activation": "relu"},
                        {"layer": "Dense", "units": 10},
                    ]
                }
                for h in (32, 128, 512)
            },
            "bn128": {
                "layers": [
                    {"layer": "Dense", "units": 128},
                    {"layer": "BatchNormalization"},
                    {"layer": "Activation", "activation": "relu"},
                    {"layer": "Dense", "units": 10},
                ]
            },
        },
    }
    mlp_study = study_from_dict(mlp, source="digits_mlp_peers", root=str(data_dir))

    cnn = _toml("digits_cnn.toml")
    cnn["train"].update(epochs=3, shuffle=False)
    cnn_study = study_from_dict(cnn, source="digits_cnn.toml", root=str(EXAMPLES))
    return [
        Case("ae_plain", ae_study, "plain", 10_000),
        Case("ae_bn", ae_study, "bn", 10_000),
        Case("digits_mlp32", mlp_study, "mlp32", 200),
        Case("digits_mlp128", mlp_study, "mlp128", 200),
        Case("digits_mlp512", mlp_study, "mlp512", 200),
        Case("digits_bn128", mlp_study, "bn128", 200),
        Case("cnn_none", cnn_study, "none", 50),
        Case("cnn_bn", cnn_study, "bn", 50),
    ]


# -- the peer's model: the same Keras layer list, read into torch terms ---------------------


@dataclass
class Layer:
    """One Keras layer of the list, in the peer's terms."""

    kind: str  # dense | conv | bn | act | pool | flatten | reshape
    units: int = 0  # dense units / conv filters
    kernel: int = 0
    activation: str = "linear"
    shape: tuple[int, ...] = ()  # reshape target (H, W, C)
    pool: int = 2


@dataclass
class Arch:
    """A layer list with its shapes worked out from the input row shape."""

    layers: list[Layer]
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Keras layouts: dense kernel (in, out), conv kernel (kh, kw, in, out)."""
    stat_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    macs_per_row: int = 0


def read_arch(specs: list[dict[str, Any]], row_shape: tuple[int, ...]) -> Arch:
    """The peer's view of a Keras layer list (the subset these cases use)."""
    arch = Arch([])
    shape = row_shape  # channels-last, like Keras
    for i, spec in enumerate(specs):
        kind = spec["layer"]
        act = spec.get("activation") or "linear"
        if kind == "Dense":
            layer = Layer("dense", units=spec["units"], activation=act)
            arch.param_shapes[f"{i}.kernel"] = (shape[-1], layer.units)
            arch.param_shapes[f"{i}.bias"] = (layer.units,)
            arch.macs_per_row += math.prod(shape) * layer.units
            shape = (*shape[:-1], layer.units)
        elif kind == "Conv2D":
            assert spec.get("padding") == "same" and spec.get("strides", 1) == 1
            k = int(spec["kernel_size"])
            layer = Layer("conv", units=spec["filters"], kernel=k, activation=act)
            arch.param_shapes[f"{i}.kernel"] = (k, k, shape[-1], layer.units)
            arch.param_shapes[f"{i}.bias"] = (layer.units,)
            arch.macs_per_row += shape[0] * shape[1] * k * k * shape[-1] * layer.units
            shape = (*shape[:-1], layer.units)
        elif kind == "BatchNormalization":
            layer = Layer("bn")
            arch.param_shapes[f"{i}.gamma"] = (shape[-1],)
            arch.param_shapes[f"{i}.beta"] = (shape[-1],)
            arch.stat_shapes[f"{i}.moving_mean"] = (shape[-1],)
            arch.stat_shapes[f"{i}.moving_variance"] = (shape[-1],)
        elif kind == "Activation":
            layer = Layer("act", activation=act)
        elif kind == "MaxPooling2D":
            layer = Layer("pool", pool=int(spec["pool_size"]))
            shape = (shape[0] // layer.pool, shape[1] // layer.pool, shape[2])
        elif kind == "Flatten":
            layer = Layer("flatten")
            shape = (math.prod(shape),)
        elif kind == "Reshape":
            layer = Layer("reshape", shape=tuple(spec["target_shape"]))
            shape = layer.shape
        else:
            raise ValueError(f"the peer does not know layer {kind}")
        assert spec.keys() <= {"layer", "units", "activation", "filters", "kernel_size",
                               "padding", "pool_size", "target_shape"}, spec  # fmt: skip
        arch.layers.append(layer)
    return arch


def _act(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(h)
    assert name == "linear", name
    return h


def init_params(arch: Arch, seeds: int, gen: torch.Generator) -> tuple[Params, Params]:
    """Keras-equivalent initial values, stacked over seeds, in Keras layouts: glorot_uniform
    kernels, zero biases, BN gamma 1 / beta 0, moving mean 0 / variance 1."""
    params: Params = {}
    for name, shape in arch.param_shapes.items():
        kind = name.split(".")[1]
        if kind == "kernel":
            receptive = math.prod(shape[:-2])
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            p = torch.rand((seeds, *shape), generator=gen) * (2 * limit) - limit
        elif kind == "gamma":
            p = torch.ones((seeds, *shape))
        else:
            p = torch.zeros((seeds, *shape))
        params[name] = p
    stats = {
        n: (torch.ones if n.endswith("variance") else torch.zeros)((seeds, *s))
        for n, s in arch.stat_shapes.items()
    }
    return params, stats


def _moving(old: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return old * BN_MOMENTUM + batch * (1.0 - BN_MOMENTUM)


# -- peer 1: hand-stacked forward, one backward --------------------------------------------


class StackedNet:
    """All seeds in one forward: activations (seeds, rows, features) for dense layers and
    (rows, seeds*channels, H, W) for conv layers. The first weight layer sees the shared
    input: one GEMM against its kernel stored (in, seeds*out), or one conv2d with
    seeds*filters output channels; later ones ``baddbmm`` / conv2d with ``groups=seeds``."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.first = next(i for i, lay in enumerate(arch.layers) if lay.kind in ("dense", "conv"))

    def to_own(self, params: Params) -> Params:
        """Keras-layout stacked params -> this net's layouts (the first dense kernel
        (in, seeds*out); conv kernels (seeds*out, in, kh, kw))."""
        own = {}
        for name, p in params.items():
            i = int(name.split(".")[0])
            lay, s = self.arch.layers[i], p.shape[0]
            if name.endswith("kernel") and lay.kind == "dense" and i == self.first:
                p = p.permute(1, 0, 2).reshape(p.shape[1], s * p.shape[2])
            elif name.endswith("kernel") and lay.kind == "conv":
                p = p.permute(0, 4, 3, 1, 2).reshape(s * p.shape[4], p.shape[3], *p.shape[1:3])
            own[name] = p.detach().clone().contiguous().requires_grad_(True)  # no aliasing
        return own

    def forward(
        self, p: Params, stats: Params, x: torch.Tensor, seeds: int, training: bool
    ) -> tuple[torch.Tensor, Params]:
        """Outputs (seeds, rows, out) and, in training, the new moving statistics."""
        h, new = x, {}
        rows = x.shape[0]
        for i, lay in enumerate(self.arch.layers):
            if lay.kind == "reshape":
                hh, ww, c = lay.shape
                h = h.reshape(rows, hh, ww, c).permute(0, 3, 1, 2)
            elif lay.kind == "dense":
                w, b = p[f"{i}.kernel"], p[f"{i}.bias"]
                if i == self.first:
                    h = torch.addmm(b.reshape(1, -1), h, w).reshape(rows, seeds, -1)
                    h = h.transpose(0, 1)
                else:
                    h = torch.baddbmm(b.unsqueeze(1), h, w)
                h = _act(h, lay.activation)
            elif lay.kind == "conv":
                w, b = p[f"{i}.kernel"], p[f"{i}.bias"].reshape(-1)
                groups = 1 if i == self.first else seeds
                h = _act(F.conv2d(h, w, b, padding=lay.kernel // 2, groups=groups), lay.activation)
            elif lay.kind == "bn":
                h, stat = self._bn(i, p, stats, h, seeds, training)
                new.update(stat)
            elif lay.kind == "act":
                h = _act(h, lay.activation)
            elif lay.kind == "pool":
                h = F.max_pool2d(h, lay.pool)
            elif lay.kind == "flatten":  # Keras order: (H, W, C) per seed
                _, _, hh, ww = h.shape
                h = h.reshape(rows, seeds, -1, hh, ww).permute(1, 0, 3, 4, 2)
                h = h.reshape(seeds, rows, -1)
        return h, new

    @staticmethod
    def _bn(
        i: int, p: Params, stats: Params, h: torch.Tensor, seeds: int, training: bool
    ) -> tuple[torch.Tensor, Params]:
        gamma, beta = p[f"{i}.gamma"], p[f"{i}.beta"]
        mm, mv = stats[f"{i}.moving_mean"], stats[f"{i}.moving_variance"]
        if h.dim() == 4:  # (rows, seeds*C, H, W): the fused kernel, batch stats
            if not training:
                out = F.batch_norm(h, mm.reshape(-1), mv.reshape(-1), gamma.reshape(-1),
                                   beta.reshape(-1), False, 0.0, BN_EPS)  # fmt: skip
                return out, {}
            out = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), True, 0.0,
                               BN_EPS)  # fmt: skip
            with torch.no_grad():
                var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
            new = {
                f"{i}.moving_mean": _moving(mm, mean.reshape(seeds, -1)),
                f"{i}.moving_variance": _moving(mv, var.reshape(seeds, -1)),
            }
            return out, new
        # (seeds, rows, C)
        if not training:
            scale = gamma * torch.rsqrt(mv + BN_EPS)
            return torch.addcmul((beta - mm * scale).unsqueeze(1), h, scale.unsqueeze(1)), {}
        var, mean = torch.var_mean(h, dim=1, correction=0, keepdim=True)
        scale = gamma.unsqueeze(1) * torch.rsqrt(var + BN_EPS)
        out = (h - mean) * scale + beta.unsqueeze(1)
        new = {
            f"{i}.moving_mean": _moving(mm, mean.detach().squeeze(1)),
            f"{i}.moving_variance": _moving(mv, var.detach().squeeze(1)),
        }
        return out, new


# -- peer 2: torch.func model ensemble -----------------------------------------------------


class SeedNet(nn.Module):
    """One seed's model as an ``nn.Module`` (Keras layouts); ``forward`` returns the output
    and, in training, the new BN moving statistics (a functional update, so it vmaps)."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        for name, shape in arch.param_shapes.items():
            self.register_parameter(name.replace(".", "_"), nn.Parameter(torch.zeros(shape)))
        for name, shape in arch.stat_shapes.items():
            self.register_buffer(name.replace(".", "_"), torch.zeros(shape))

    def forward(self, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, Params]:
        h, new = x, {}
        rows = x.shape[0]
        for i, lay in enumerate(self.arch.layers):
            get = lambda n, i=i: getattr(self, f"{i}_{n}")  # noqa: E731
            if lay.kind == "reshape":
                hh, ww, c = lay.shape
                h = h.reshape(rows, hh, ww, c).permute(0, 3, 1, 2)
            elif lay.kind == "dense":
                h = _act(h @ get("kernel") + get("bias"), lay.activation)
            elif lay.kind == "conv":
                w = get("kernel").permute(3, 2, 0, 1)
                h = _act(F.conv2d(h, w, get("bias"), padding=lay.kernel // 2), lay.activation)
            elif lay.kind == "bn":
                dims = (0, 2, 3) if h.dim() == 4 else (0,)
                view = (1, -1, 1, 1) if h.dim() == 4 else (1, -1)
                mm, mv = get("moving_mean"), get("moving_variance")
                if training:
                    var, mean = torch.var_mean(h, dim=dims, correction=0)
                    new[f"{i}.moving_mean"] = _moving(mm, mean.detach())
                    new[f"{i}.moving_variance"] = _moving(mv, var.detach())
                else:
                    mean, var = mm, mv
                scale = get("gamma") * torch.rsqrt(var + BN_EPS)
                h = (h - mean.reshape(view)) * scale.reshape(view) + get("beta").reshape(view)
            elif lay.kind == "act":
                h = _act(h, lay.activation)
            elif lay.kind == "pool":
                h = F.max_pool2d(h, lay.pool)
            elif lay.kind == "flatten":
                h = h.permute(0, 2, 3, 1).reshape(rows, -1)
        return h, new


# -- training, shared by both peers ---------------------------------------------------------


@dataclass
class TrainData:
    """The rows both sides train on (ablab's own split), as torch tensors."""

    x: torch.Tensor
    y: torch.Tensor  # float targets (MSE) or class indices (CE)
    x_val: torch.Tensor
    y_val: torch.Tensor
    classify: bool
    accuracy: bool
    batch_size: int
    epochs: int

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """fit's order without shuffling: full batches, then the last partial one."""
        n, bs = self.x.shape[0], self.batch_size
        return [(self.x[s : s + bs], self.y[s : s + bs]) for s in range(0, n, bs)]


def train_data(program: VariantProgram) -> TrainData:
    sp, t = program.split, program.prepared.train
    assert sp.x_val is not None and sp.y_val is not None and not t.shuffle
    classify = t.loss_name == "sparse_categorical_crossentropy"

    def target(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(-1).astype(np.int64)) if classify else torch.tensor(a)

    return TrainData(
        torch.tensor(sp.x_train), target(sp.y_train), torch.tensor(sp.x_val), target(sp.y_val),
        classify, "accuracy" in t.metric_names(), t.batch_size, t.epochs,
    )  # fmt: skip


def seed_losses(out: torch.Tensor, y: torch.Tensor, classify: bool) -> torch.Tensor:
    """Per-seed mean loss of ``out`` (seeds, rows, k) against ``y`` (rows[, k]): Keras'
    MSE or sparse categorical cross-entropy from logits, mean over the batch."""
    if not classify:
        return (out - y).square().mean(dim=(1, 2))
    lse = torch.logsumexp(out, dim=2)
    picked = out.gather(2, y.expand(out.shape[0], -1).unsqueeze(2)).squeeze(2)
    return (lse - picked).mean(dim=1)


class KerasAdam:
    """Keras 3's Adam on stacked tensors: alpha = lr sqrt(1 - b2^t) / (1 - b1^t),
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), p -= alpha m / (sqrt(v) + eps)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.t += 1
        alpha = ADAM_LR * math.sqrt(1 - ADAM_B2**self.t) / (1 - ADAM_B1**self.t)
        grads = list(grads)
        torch._foreach_lerp_(self.m, grads, 1 - ADAM_B1)
        torch._foreach_mul_(self.v, ADAM_B2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - ADAM_B2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denom, ADAM_EPS)
        torch._foreach_addcdiv_(self.params, self.m, denom, -alpha)


@dataclass
class PeerResult:
    """The last epoch's History of every seed, each (seeds,): what ablab's History holds
    (the peer computes the same logs, so it does the same work)."""

    val_loss: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None = None
    val_accuracy: np.ndarray | None = None

    @classmethod
    def of(
        cls, data: TrainData, val: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
        val_correct: torch.Tensor | None,
    ) -> PeerResult:  # fmt: skip
        n = data.x.shape[0]
        if val_correct is None:
            return cls(val.numpy(), (loss_sum / n).numpy())
        acc, val_acc = correct / n, val_correct / data.x_val.shape[0]
        return cls(val.numpy(), (loss_sum / n).numpy(), acc.numpy(), val_acc.numpy())


def _accuracy_count(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=-1) == y).sum(dim=-1)


def train_stacked(
    arch: Arch,
    data: TrainData,
    seeds: int,
    init: tuple[Params, Params] | None = None,
    stream: int = 0,
) -> PeerResult:
    """Peer ``stacked``: hand-stacked forward, one backward of the summed per-seed losses."""
    net = StackedNet(arch)
    if init is None:
        init = init_params(arch, seeds, torch.Generator().manual_seed(stream))
    p = net.to_own(init[0])
    stats = {k: v.clone() for k, v in init[1].items()}
    names = list(p)
    opt = KerasAdam([p[n] for n in names])
    batches = data.batches()
    for _ in range(data.epochs):
        loss_sum = torch.zeros(seeds)
        correct = torch.zeros(seeds, dtype=torch.int64)
        for xb, yb in batches:
            out, new = net.forward(p, stats, xb, seeds, training=True)
            losses = seed_losses(out, yb, data.classify)
            grads = torch.autograd.grad(losses.sum(), [p[n] for n in names])
            opt.step(grads)
            stats.update(new)
            with torch.no_grad():
                loss_sum += losses.detach() * xb.shape[0]
                if data.accuracy:
                    correct += _accuracy_count(out.detach(), yb)
        with torch.no_grad():
            out, _ = net.forward(p, stats, data.x_val, seeds, training=False)
            val = seed_losses(out, data.y_val, data.classify)
            val_correct = _accuracy_count(out, data.y_val) if data.accuracy else None
    return PeerResult.of(data, val, loss_sum, correct, val_correct)


def train_vmap(
    arch: Arch,
    data: TrainData,
    seeds: int,
    init: tuple[Params, Params] | None = None,
    stream: int = 0,
) -> PeerResult:
    """Peer ``vmap``: ``functional_call`` of one per-seed module, ``vmap(grad_and_value)``."""
    net = SeedNet(arch)
    if init is None:
        init = init_params(arch, seeds, torch.Generator().manual_seed(stream))
    params = {k.replace(".", "_"): v.clone() for k, v in init[0].items()}
    stats = {k.replace(".", "_"): v.clone() for k, v in init[1].items()}
    names = list(params)
    opt = KerasAdam([params[n] for n in names])

    def loss_fn(
        prm: Params, buf: Params, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, Params, torch.Tensor]]:
        out, new = functional_call(net, (prm, buf), (x,), {"training": True})
        loss = seed_losses(out.unsqueeze(0), y, data.classify)[0]
        return loss, (loss, new, out.argmax(dim=-1) if data.accuracy else loss)

    def predict(prm: Params, buf: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, (prm, buf), (x,), {"training": False})[0]

    step = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, None, None))
    evaluate = vmap(predict, in_dims=(0, 0, None))
    batches = data.batches()
    for _ in range(data.epochs):
        loss_sum = torch.zeros(seeds)
        correct = torch.zeros(seeds, dtype=torch.int64)
        for xb, yb in batches:
            grads, (_, (losses, new, pred)) = step(params, stats, xb, yb)
            opt.step([grads[n] for n in names])
            stats.update({k.replace(".", "_"): v for k, v in new.items()})
            loss_sum += losses * xb.shape[0]
            if data.accuracy:
                correct += (pred == yb).sum(dim=-1)
        with torch.no_grad():
            out = evaluate(params, stats, data.x_val)
            val = seed_losses(out, data.y_val, data.classify)
            val_correct = _accuracy_count(out, data.y_val) if data.accuracy else None
    return PeerResult.of(data, val, loss_sum, correct, val_correct)


PEERS: dict[str, Callable[..., PeerResult]] = {"stacked": train_stacked, "vmap": train_vmap}


# -- ablab's side ---------------------------------------------------------------------------


class AblabRunner:
    """One case's program, its seeds cut into cells and trained as `ablab run` trains them."""

    def __init__(self, case: Case, seeds: int) -> None:
        self.program = build_program(case.study, case.variant, probes=False)
        budget = case.study.engine.memory_budget_mb
        self.chunk = chunk_size_alone(self.program, seeds, budget)
        self.workers = default_workers()
        self.compile_s = self.program.compile(self.chunk)
        self.cells = [
            Cell(case.name, k, ids, real, False)
            for k, ids, real in seed_chunks(0, seeds, self.chunk)
        ]
        t0 = time.perf_counter()
        first = self.program.train(self.cells[0].seed_ids)  # the first call allocates
        self.warmup_s = time.perf_counter() - t0
        self.first_val_loss = first["val_loss"][: self.cells[0].real, -1]

    def train(self) -> np.ndarray:
        """Train every seed; returns the final val_loss per seed (seeds,)."""
        executor = LocalExecutor(lambda cell: self.program, workers=self.workers)
        out: dict[int, np.ndarray] = {}
        try:
            for cell, (history, _, _) in executor.run_cells(self.cells):
                out[cell.chunk] = history["val_loss"][: cell.real, -1]
        finally:
            executor.close()
        return np.concatenate([out[k] for k in sorted(out)])


# -- measuring ------------------------------------------------------------------------------


def sgemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """float32 ``torch.mm`` of two n x n matrices with ``threads`` threads: best GFLOP/s."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_seed(arch: Arch, data: TrainData) -> float:
    """~6 P per training row + 2 P per validation row, per epoch (P: multiply-adds per row)."""
    rows = 6 * data.x.shape[0] + 2 * data.x_val.shape[0]
    return float(arch.macs_per_row * rows * data.epochs)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _agree(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """Do the two seed means agree (within AGREE_PCT or 3 standard errors)? And the relative
    difference of the means."""
    diff = abs(float(a.mean()) - float(b.mean()))
    se = (
        math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if min(len(a), len(b)) > 1 else 0
    )
    rel = diff / abs(float(a.mean()))
    return rel * 100 <= AGREE_PCT or diff <= 3 * se, rel


@dataclass(frozen=True)
class Candidate:
    """One way to run a peer: ``variant`` with ``threads`` torch intra-op threads, its seeds
    cut into ``split`` groups trained at once in Python threads (torch releases the GIL in
    its kernels: the peer's counterpart of ablab's concurrent chunk calls)."""

    variant: str
    threads: int
    split: int = 1

    @property
    def name(self) -> str:
        return f"{self.variant}@{self.threads}" + (f"x{self.split}" if self.split > 1 else "")

    def run(self, arch: Arch, data: TrainData, seeds: int) -> np.ndarray:
        """Train ``seeds`` fresh seeds; their final val_loss (seeds,)."""
        torch.set_num_threads(self.threads)
        peer = PEERS[self.variant]
        if self.split == 1:
            return peer(arch, data, seeds).val_loss
        sizes = [len(a) for a in np.array_split(np.arange(seeds), self.split) if len(a)]
        with ThreadPoolExecutor(len(sizes)) as pool:
            futures = [pool.submit(peer, arch, data, n, None, k) for k, n in enumerate(sizes)]
            return np.concatenate([f.result().val_loss for f in futures])


def run_case(case: Case, seeds: int, rounds: int, candidates: list[Candidate]) -> dict[str, Any]:
    """Time ``case``: ablab and the peer candidates in rounds; see the module docstring."""
    ablab = AblabRunner(case, seeds)
    arch = read_arch(case.study.variant_layers(case.variant), ablab.program.split.x_train.shape[1:])
    data = train_data(ablab.program)

    # exact check: each peer variant from ablab's own initial weights, on the seeds of
    # ablab's first cell (a chunk may hold fewer than EXACT_SEEDS)
    n_exact = min(EXACT_SEEDS, len(ablab.first_val_loss))
    tv, ntv = ablab.program.initial_weights(np.arange(n_exact, dtype=np.uint32))
    init = (
        {n: torch.tensor(a) for n, a in zip(arch.param_shapes, tv, strict=True)},
        {n: torch.tensor(a) for n, a in zip(arch.stat_shapes, ntv, strict=True)},
    )
    ref = ablab.first_val_loss[:n_exact]
    exact = {}
    torch.set_num_threads(1)
    for variant in dict.fromkeys(c.variant for c in candidates):
        got = PEERS[variant](arch, data, n_exact, init).val_loss
        exact[variant] = float(np.max(np.abs(got - ref) / np.abs(ref)))

    # selection (also the warm-up): every candidate once, 1 epoch; the slow ones drop out
    one_epoch = dataclasses.replace(data, epochs=1)
    first: dict[str, float] = {}
    for c in candidates:
        first[c.name], _ = _timed(lambda c=c: c.run(arch, one_epoch, seeds))
    fastest = min(first.values())
    # ... but the fastest at 1 torch thread always stays: on a shared machine an
    # all-cores candidate's lock-step threads can stall for a whole run when another
    # process takes a core, and a single selection run may have missed that
    steady = min(
        (c for c in candidates if c.threads == 1), key=lambda c: first[c.name], default=None
    )
    kept = [c for c in candidates if first[c.name] <= KEEP * fastest or c == steady]

    times: dict[str, list[float]] = {"ablab": [], **{c.name: [] for c in kept}}
    finals: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        dt, finals["ablab"] = _timed(ablab.train)
        times["ablab"].append(dt)
        for c in kept:
            dt, finals[c.name] = _timed(lambda c=c: c.run(arch, data, seeds))
            times[c.name].append(dt)
    medians = {k: statistics.median(v) for k, v in times.items()}
    best = min((c.name for c in kept), key=medians.__getitem__)
    ratios = [p / a for a, p in zip(times["ablab"], times[best], strict=True)]
    flops = flops_per_seed(arch, data) * seeds
    ok, rel = _agree(finals["ablab"], finals[best])
    return {
        "seeds": seeds,
        "epochs": data.epochs,
        "chunk": ablab.chunk,
        "workers": ablab.workers,
        "ablab_runs_per_s": seeds / medians["ablab"],
        "peer_runs_per_s": seeds / medians[best],
        "ratio": statistics.median(ratios),
        "best_peer": best,
        "ablab_gflops": flops / medians["ablab"] / 1e9,
        "peer_gflops": flops / medians[best] / 1e9,
        "val_loss_ablab": float(finals["ablab"].mean()),
        "val_loss_peer": float(finals[best].mean()),
        "val_loss_rel_diff": rel,
        "val_loss_agree": ok,
        "exact_max_rel": exact,
        "compile_s": ablab.compile_s,
        "ablab_warmup_s": ablab.warmup_s,
        "selection_1epoch_s": first,
        "candidates": {c.name: seeds / medians[c.name] for c in kept},
        "macs_per_row": arch.macs_per_row,
    }


def _table(results: dict[str, dict[str, Any]], sgemm_all: float) -> list[str]:
    head = (
        f"{'case':<14} {'seeds':>6} {'ablab r/s':>10} {'peer r/s':>10} {'ratio':>6} "
        f"{'best peer':<12} {'ablab GF/s':>10} {'%sgemm':>7} {'peer GF/s':>9} {'%sgemm':>7} "
        f"{'val ablab':>9} {'val peer':>9} {'agree':>7} {'exact':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        exact = max(r["exact_max_rel"].values())
        agree = f"{100 * r['val_loss_rel_diff']:.1f}%" + ("" if r["val_loss_agree"] else "!")
        lines.append(
            f"{name:<14} {r['seeds']:>6} {r['ablab_runs_per_s']:>10,.1f} "
            f"{r['peer_runs_per_s']:>10,.1f} {r['ratio']:>6.2f} {r['best_peer']:<12} "
            f"{r['ablab_gflops']:>10.2f} {100 * r['ablab_gflops'] / sgemm_all:>6.1f}% "
            f"{r['peer_gflops']:>9.2f} {100 * r['peer_gflops'] / sgemm_all:>6.1f}% "
            f"{r['val_loss_ablab']:>9.4f} {r['val_loss_peer']:>9.4f} {agree:>7} {exact:>8.1e}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ["ae_plain", "ae_bn", "digits_mlp32", "digits_mlp128", "digits_mlp512",
             "digits_bn128", "cnn_none", "cnn_bn"]  # fmt: skip
    parser.add_argument("--case", action="append", choices=names, help="repeatable; default all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=None, help="override every case's seeds")
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads", default=",".join(dict.fromkeys(["1", str(cores)])),
        help="torch thread counts the peer is timed with (comma-separated)",
    )  # fmt: skip
    parser.add_argument("--peers", default="stacked,vmap", help="peer variants to time")
    parser.add_argument(
        "--split", type=int, default=cores,
        help="also time each variant with its seeds in this many groups at once, 1 torch "
        "thread each (1: not)",
    )  # fmt: skip
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    variants = args.peers.split(",")
    assert set(variants) <= set(PEERS), variants
    candidates = [Candidate(v, t) for v in variants for t in threads]
    if args.split > 1:
        candidates += [Candidate(v, 1, args.split) for v in variants]

    sgemm = {1: sgemm_gflops(1), cores: sgemm_gflops(cores)}
    print(
        f"# {cpu_model() or platform.machine()}, {cores} cores, load "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), keras {keras.__version__}, torch {torch.__version__}"
    )
    print(
        f"# sgemm at the start (torch.mm float32 2048x2048): {sgemm[1]:.1f} GFLOP/s at 1 "
        f"thread, {sgemm[cores]:.1f} at {cores} threads"
    )
    print(
        f"# peer candidates {[c.name for c in candidates]} (variant@torch threads[xgroups at "
        f"once]); rounds {args.rounds}; ablab: `ablab run`'s chunks and workers"
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ablab-peers-") as tmp:
        for case in build_cases(Path(tmp)):
            if args.case and case.name not in args.case:
                continue
            seeds = args.seeds or case.seeds
            t0 = time.perf_counter()
            r = run_case(case, seeds, args.rounds, candidates)
            results[case.name] = r
            cands = ", ".join(f"{k} {v:,.1f}" for k, v in r["candidates"].items())
            sel = ", ".join(f"{k} {v:.2f}" for k, v in r["selection_1epoch_s"].items())
            exact = ", ".join(f"{k} {v:.1e}" for k, v in r["exact_max_rel"].items())
            print(
                f"{case.name}: ablab {r['ablab_runs_per_s']:,.1f} runs/s (chunk {r['chunk']}, "
                f"{r['workers']} workers; compile {r['compile_s']:.2f} s, warm-up call "
                f"{r['ablab_warmup_s']:.2f} s); peer runs/s: {cands}; peer selection s (1 "
                f"epoch, first call): {sel}; exact: {exact}; case took "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    end = {1: sgemm_gflops(1), cores: sgemm_gflops(cores)}
    sgemm = {t: max(sgemm[t], end[t]) for t in sgemm}  # the less disturbed of the two
    print(
        f"\n# sgemm at the end: {end[1]:.1f} GFLOP/s at 1 thread, {end[cores]:.1f} at {cores}; "
        f"%sgemm below is of the better {cores}-thread figure, {sgemm[cores]:.1f} GFLOP/s; "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for line in _table(results, sgemm[cores]):
        print(line)
    print(
        "ratio = ablab runs/s / best peer runs/s (median of per-round ratios); agree = "
        f"relative difference of the seed-mean final val_loss ('!' = MISMATCH: over "
        f"{AGREE_PCT:g} % and 3 SE); exact = max relative val_loss difference, peer from "
        f"ablab's initial weights (up to {EXACT_SEEDS} seeds: those of ablab's first cell)"
    )
    for name, r in results.items():
        if not r["val_loss_agree"]:
            print(f"MISMATCH {name}: val_loss ablab {r['val_loss_ablab']:.5f} vs peer "
                  f"{r['val_loss_peer']:.5f}")  # fmt: skip
    doc = {
        "sgemm_gflops": {"1": round(sgemm[1], 2), "all": round(sgemm[cores], 2)},
        "cpu": cpu_model() or platform.machine(),
        "cores": cores,
        "threads": threads,
        "rounds": args.rounds,
        "cases": {
            name: {
                **r,
                "ablab_pct_sgemm": 100 * r["ablab_gflops"] / sgemm[cores],
                "peer_pct_sgemm": 100 * r["peer_gflops"] / sgemm[cores],
            }
            for name, r in results.items()
        },
    }
    print(json.dumps(doc, default=float))


if __name__ == "__main__":
    main()
