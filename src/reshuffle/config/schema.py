"""Configuration schemas: a machine's system config and an experiment's run config.

Frozen, keyword-only dataclasses; every field has a comment that says what it does. YAML files
and ``key=value`` overrides are validated against these by :mod:`reshuffle.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# --------------------------------------------------------------------------- system config


@dataclass(frozen=True, kw_only=True)
class DatasetEntry:
    """How one dataset name is loaded on this machine."""

    loader: str  # a loader of reshuffle.data.LOADERS: fashion-mnist, cifar10, digits, imagefolder, synthetic
    path: str | None = None  # where its files are (null: the loader's default places)
    download: bool = False  # with internet access, let torchvision fetch missing files into `path`
    options: dict[str, Any] = field(default_factory=dict)  # loader keywords, e.g. {image_size: 64}
    mean: list[float] = field(default_factory=lambda: [0.5])  # per-channel mean for `normalize`
    std: list[float] = field(default_factory=lambda: [0.25])  # per-channel std for `normalize`
    # Applied in order to uint8 images scaled to [0, 1]: normalize, random-crop:PAD, horizontal-flip.
    train_transforms: list[str] = field(default_factory=lambda: ["normalize"])
    test_transforms: list[str] = field(default_factory=lambda: ["normalize"])


BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"loader": "fashion-mnist", "mean": [0.2860], "std": [0.3530]},
    "cifar10": {
        "loader": "cifar10",
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "train_transforms": ["random-crop:4", "horizontal-flip", "normalize"],
    },
    "digits": {"loader": "digits", "mean": [0.3], "std": [0.4]},
    "synthetic": {"loader": "synthetic", "mean": [0.5], "std": [0.25]},
}


@dataclass(frozen=True, kw_only=True)
class SystemConfig:
    """Machine-specific settings, shared by every run on the machine."""

    # Dataset registry: name -> entry. Built-in names (fashion-mnist, cifar10, digits, synthetic)
    # work without an entry; an entry here overrides or adds to them.
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with a GPU per local rank, else gloo
    master_addr: str = "127.0.0.1"  # rendezvous address for local multi-process launches
    master_port: int = 29500  # default rendezvous port (0: pick a free one)
    origin: str = "built-in defaults"  # set when loaded: the file these settings came from


# --------------------------------------------------------------------------- run config


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Size and shape of the `synthetic` dataset (ignored by the others)."""

    num_samples: int = 4096  # training samples
    test_samples: int = 1024
    num_classes: int = 10
    shape: tuple[int, int, int] = (1, 28, 28)  # channels, height, width
    sample_bytes: int | None = None  # stored bytes per sample (>= pixels); pads to make exchanges cost
    noise: float = 1.0  # pixel noise relative to the class prototypes' contrast; larger is harder
    data_seed: int = 0  # the data's own seed, independent of the run's


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "synthetic"  # a dataset name: built in or in the system config's registry
    train_limit: int | None = None  # train on the first K samples only (quick runs); null: all
    test_limit: int | None = None  # evaluate on the first K test samples only; null: all
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "small-cnn"  # small-cnn | resnet18 | mlp | a torchvision model name, e.g. tv:resnet50
    # Normalisation layers: batch (BatchNorm; DDP broadcasts rank 0's running statistics),
    # sync-batch (SyncBatchNorm: statistics over all ranks), group (GroupNorm), none.
    norm: Literal["batch", "sync-batch", "group", "none"] = "batch"
    # sync-batch: which ranks share statistics: all, node (dist.ranks_per_node ranks, consecutive),
    # or an integer G (groups of G consecutive ranks; G divides the number of ranks)
    sync_group: Literal["all", "node"] | int = "all"
    width: int = 32  # channels of the first layer; later layers scale from it
    dropout: float = 0.0  # dropout before the classifier


@dataclass(frozen=True, kw_only=True)
class ShuffleConfig:
    strategy: str = "global"  # global | local | partial | importance | corgipile (reshuffle.STRATEGIES)
    fraction: float = 0.0  # Q for partial: share of each partition exchanged per epoch
    select: Literal["random", "importance"] = "random"  # partial: which k samples leave a rank
    warmup_epochs: int = 2  # importance: epochs of global shuffling while losses are tracked
    ignore_epochs: int = 0  # importance: first epochs whose losses the first re-partition ignores
    interval_epochs: int = 0  # importance: re-partition every K epochs (0: once, after warm-up)
    measure: Literal["mean", "variance"] = "mean"  # importance: of each sample's tracked losses
    assignment: Literal["stripes", "blocks"] = "stripes"  # importance: how the sorted ids are dealt out
    unit: Literal["sample", "block"] = "sample"  # partial: move single samples, or whole blocks of ids
    block_size: int = 256  # corgipile, partial with unit=block: consecutive ids per block (a shard's run)
    buffer_blocks: int = 8  # corgipile: blocks shuffled together (the tuple-level shuffle's buffer)
    partition: str = "random"  # random | contiguous | strided | label-sorted | stratified
    # rank: every rank its own storage island. node: the strategy and the partition apply to nodes
    # of dist.ranks_per_node ranks, and each node re-deals its samples among its ranks every epoch.
    level: Literal["rank", "node"] = "rank"
    mode: Literal["index", "store"] = "index"  # index: read the shared dataset; store: node-local stores
    store_dir: str | None = None  # store mode: directory of the rank stores (null: <run dir>/store)
    drop_last: bool = False  # truncate ranks to floor(N/M) instead of padding to ceil(N/M)
    exchange_chunk_mb: float = 64.0  # store mode: at most this much leaves a rank per payload round


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 64  # per rank
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    optimizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"momentum": 0.9, "weight_decay": 5e-4})
    lr: float = 0.05  # learning rate at the reference batch
    reference_batch: int = 256  # LR is scaled by (batch_size * world size) / reference_batch
    warmup_epochs: float = 0.0  # linear LR warm-up from 0, in epochs (fractions allowed)
    schedule: Literal["constant", "step", "cosine"] = "cosine"  # after warm-up
    step_epochs: list[int] = field(default_factory=list)  # step schedule: epochs where LR drops
    step_gamma: float = 0.1  # step schedule: factor at each drop
    criterion: Literal["cross-entropy"] = "cross-entropy"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # > 0: mixup with Beta(alpha, alpha) weights
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast dtype (fp16 needs CUDA; bf16 works on CPU)
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile backend (inductor, aot_eager, ...)
    channels_last: bool = False  # channels-last memory format for conv models
    # Gradient sync: overlapped (DDP's bucketed all-reduce inside backward; fw_bw_s then holds its
    # exposed part) or explicit (backward without sync, then one flat all-reduce timed as ge_wu_s).
    grad_sync: Literal["overlapped", "explicit"] = "overlapped"
    track_losses: bool = False  # track and reduce per-sample losses even if the strategy does not use them
    bn_recalibrate: bool = False  # re-estimate BatchNorm running stats each epoch, averaged over ranks
    bn_recalibrate_batches: int = 8  # batches of each rank's own data used for recalibration
    workers: int = 0  # DataLoader worker processes per rank
    pin_memory: bool = False
    # resident: keep the training set decoded and transformed on the device and gather batches there
    # (index mode, no random augmentation; decoded once); auto: on a GPU when it fits in 1/4 of
    # the free memory; on: also on the CPU (or an error saying why it cannot)
    resident: Literal["auto", "on", "off"] = "auto"
    # keep memory the process frees for reuse (glibc malloc: no mmap per large block, no trimming):
    # each step's activations then reuse pages instead of page-faulting fresh ones (1.4-2x per epoch
    # on a CPU at batch 1,024); the process holds its peak memory. auto: when training on the CPU
    keep_freed_memory: Literal["auto", "on", "off"] = "auto"
    deterministic: bool = False  # deterministic algorithms and seeded workers (exact resume on CPU)
    checkpoint_every: int = 1  # save a checkpoint every K epochs (0: only at the end)
    checkpoint_steps: int = 0  # also save every K steps within an epoch (0: never)
    keep_checkpoints: int = 2  # keep the newest K checkpoints
    max_steps: int = 0  # stop after this many steps in total (0: no limit; for tests and debugging)


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    nproc: int = 1  # local ranks `reshuffle run` starts (ignored under torchrun or srun)
    timeout_s: float = 300.0  # a collective that waits longer than this ends the job with an error
    virtual_ranks: int = 0  # > 0: one process trains as this many DDP ranks (reshuffle run --virtual-ranks)
    virtual_batch_limit: int = 8192  # virtual ranks: at most this many samples per forward (ranks chunked)
    ranks_per_node: int | None = None  # null: torchrun's LOCAL_WORLD_SIZE (local launch: all ranks)
    # How a local launch (`reshuffle run --nproc N`, not torchrun) places N ranks when the machine
    # has GPUs but fewer than N: auto trains them as N virtual ranks on the GPU (one process, DDP's
    # semantics; index mode), processes starts N processes (gloo on the CPU: the GPUs stay idle).
    place: Literal["auto", "processes", "virtual"] = "auto"


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    dir: str = "runs"  # runs are written to <dir>/<name>/
    tensorboard: bool = False  # TensorBoard event files in <run>/tensorboard
    wandb: Literal["off", "online", "offline"] = "off"  # Weights & Biases (offline: sync later)
    wandb_project: str = "reshuffle"
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal, lines otherwise
    every_steps: int = 50  # with progress lines: a line every this many steps (0: per epoch only)
    step_losses: bool = False  # also write metrics/steps.csv: every step's loss, mean over ranks


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One experiment."""

    name: str = "run"  # the run directory is <log.dir>/<name>
    seed: int = 0  # all randomness (plan, init, augmentation) derives from it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
