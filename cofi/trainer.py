"""One training loop for every phase: teacher fine-tuning, CoFi pruning, and
fine-tuning with a fixed structure.

- Teacher (no teacher model given): gold-label loss.
- Distillation (a teacher and a ``cofi.distill.DistillationLoss`` given): the loss
  of the student's outputs against the frozen teacher's.
- Pruning (a ``cofi.pruning.PruneConfig`` given): distillation with hard-concrete
  masks and the Lagrangian that steers them to a target (``cofi.pruning``). Every
  step logs ``mask_sparsity`` (of the deterministic masks) and ``expected_sparsity``
  (ŝ of the keep probabilities); with a speedup target also ``predicted_speedup``,
  ``expected_speedup`` and ``target_speedup``. The best checkpoint is chosen among
  evaluations within tolerance of the final target.
- Fixed structure: fixed masks on the full model, or a compacted model.

This module imports neither: the pruning and distillation state come from the
objects the caller passes in, so training a teacher runs no pruning code (and a
change to it reruns no teacher stage).

The loop is seeded and resumable: the example order of an epoch is a function of
(seed, epoch), a pruning step's mask noise a function of (seed, step)
(``cofi.pruning.gate_noise_generator``), and a checkpoint (cofi.checkpoint, on Accelerate) holds
every other piece of state (weights, gates, λ, optimizers, schedule, every process's
random states) so a resumed run, of one process or several, continues as if never stopped.
SIGINT and SIGTERM are deferred to the end of the current step, which is then
checkpointed. Under torchrun / accelerate launch (cofi.distributed) each of N
processes takes every N-th example of the global batch; gradients are summed
across processes before one identical update, so replicas never diverge. A step
draws one mask sample for the whole global batch (CoFi's one sample per update):
every process and micro-batch uses the same noise, so N processes, or one with
N micro-batches, take the step one process takes, up to rounding; dropout draws
its own numbers per process.
The library logs nothing itself; pass callbacks to record metrics.

A training step never waits for the device: its logged values (losses, sparsities, λ,
gradient norm) stay device tensors until the host reads them all at once every
``log_steps`` steps, before every evaluation and checkpoint, and at the end.
That read is where a non-finite value is caught (naming its step), where the
processes agree on a stop signal, and where callbacks see each step.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch._dynamo
import torch._inductor.exc
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from cofi.batching import Collator, Example, batches, epoch_order, steps_per_epoch
from cofi.distributed import Processes
from cofi.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from cofi.errors import NonFiniteLossError, TrainingInterrupted, check_range
from cofi.metrics import MetricFn

if TYPE_CHECKING:
    from cofi.distill import Distillation, DistillationLoss
    from cofi.pruning import Pruning, PruneConfig
    from cofi.teacher_cache import TeacherCache

log = logging.getLogger(__name__)

# what torch.compile raises when it cannot compile (not errors of the model itself)
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # fraction of steps with a linearly rising learning rate
    group_by_length: bool = True  # batches of similar length: far less padding (see batching.epoch_order)
    accumulation_steps: int = 1  # micro-batches per process per step; batch_size stays the effective batch
    max_grad_norm: float = 1.0
    bf16: bool = False  # autocast to bfloat16 where the device has it (CPU; CUDA from Ampere); else fp32
    # The word-embedding table keeps its loaded values. Its gradient is dense (vocabulary ×
    # width: half of MiniLM's weights) though a batch touches a few hundred rows: freezing
    # it made CPU pruning steps 11% faster, at about half a point of accuracy (README).
    freeze_word_embeddings: bool = False
    seed: int = 42
    eval_steps: int = 0  # evaluate (and checkpoint) every this many steps; 0: once per epoch
    # Evaluate the model as given before the first step, as a candidate for the best
    # checkpoint: fine-tuning then never returns a model worse on the evaluation set than
    # the one it started from (a 0.9 model lost 0.46 point to its fine-tuning; README)
    evaluate_at_start: bool = False
    eval_batch_size: int = 128
    device: str = "auto"  # "auto": CUDA when available, else CPU
    progress: bool = True
    # The host reads the logged values every this many steps: each read waits for
    # the device, so on a GPU a read per step would stall its queue every step.
    log_steps: int = 10
    # GiB of the training device kept for the teacher's outputs, so that each example's
    # are computed once, not once per epoch (cofi.teacher_cache); 0: computed every step
    teacher_cache_gb: float = 0.0
    # torch.compile (inductor) of the student's training forward and backward; on CUDA with
    # CUDA graphs (mode "reduce-overhead"). Every unit is then computed masked
    # (modeling_cofi's static_shapes), as a per-step choice of units would recompile.
    # Where compilation fails, training goes on eagerly with a warning.
    compile: bool = False

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 0.0, math.inf, low_open=True)
        check_range("batch_size", self.batch_size, 1, math.inf)
        check_range("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True)
        check_range("accumulation_steps", self.accumulation_steps, 1, math.inf)
        check_range("log_steps", self.log_steps, 1, math.inf)
        check_range("teacher_cache_gb", self.teacher_cache_gb, 0.0, math.inf)


PER_EXAMPLE_PARTS = ("ce", "pred")  # means over a micro-batch's examples
PER_TOKEN_PARTS = ("layer",)  # means over its real tokens; "data" and "distill" combine both, the rest are global


class TrainerCallback:
    """Hooks through which a caller records progress (the library logs nowhere).

    ``on_step`` comes for every step, in order, when the host reads the logged
    values (every ``log_steps`` steps, and before evaluations and checkpoints).
    """

    def on_step(self, step: int, logs: Mapping[str, float]) -> None: ...

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None: ...


@dataclass
class TrainResult:
    best_step: int
    best_metrics: dict[str, float]
    evaluations: list[dict[str, float]]
    masks: dict[str, Tensor] | None  # deterministic masks of the best checkpoint (pruning only)
    history: list[dict[str, float]]  # every step's logged values, resumed runs included
    target_reached: bool = True


@contextmanager
def _deferred_stop_signals():
    """Within the block, SIGINT and SIGTERM are recorded (in the yielded list) instead of
    raising mid-step; the loop checks the list between steps. Outside the main
    thread signals cannot be caught and are left alone."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stops}
    for s in stops:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively on ``device``: x86 CPUs with AVX-512-BF16 or AMX, CUDA
    GPUs from Ampere. Elsewhere bf16 is emulated: on an AVX2-only AMD EPYC (Zen 3) a
    MiniLM training step under bf16 autocast took 18.6 s against 0.84 s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def device_name(device: torch.device) -> str:
    """The device in words, for messages: the GPU's name, or the CPU's vector extensions."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return str(device)


def use_tf32(device: torch.device) -> None:
    """fp32 matrix products on TF32 tensor cores (Ampere and newer): ~6x the fp32 rate on
    an A100/H100 for a 10-bit mantissa in the products, with fp32 accumulation."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def training_attention(device: torch.device, bf16: bool):
    """The attention kernel of a trained forward pass. On CPU under bf16 autocast, SDPA's
    fused (flash) kernel has a slow backward at these short sequences: a MiniLM pruning
    step at batch 32 × 16 without dropout took 359 ms with it, 277 ms with the plain
    (math) one (AVX-512 EPYC; benchmarks/bench_prune_step.py measures both). With
    attention dropout torch takes the math kernel anyway. Inference keeps the fused
    kernel, faster there (bf16, 128 × 24: 241 against 370 ms), and so does every GPU."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" and bf16 else nullcontext()


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """To the device; on CUDA through pinned memory, so the copy does not block the host."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Sequence[Example],
    collate: Collator,
    masks: Mapping[str, Tensor] | None = None,
    batch_size: int = 128,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and gold labels for a dataset (classes, or scores if num_labels == 1).

    Examples are batched by length (less padding); results come back in dataset order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bf16 = bf16 and supports_bf16(device)
    order = torch.tensor(sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"])))
    outputs = []
    for batch in batches(dataset, batch_size, collate, order):
        batch = _to(batch, device)
        with autocast(device, bf16):
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], masks=masks).logits
        outputs.append(logits.float())
    logits = torch.cat(outputs).cpu()[order.argsort()]  # one read of the device, at the end
    model.train(was_training)
    preds = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
    labels = torch.tensor([dataset[i]["label"] for i in range(len(dataset))])
    return preds.numpy(), labels.numpy()


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_data: Sequence[Example],
        eval_data: Sequence[Example],
        config: TrainConfig,
        *,
        metric_fn: MetricFn,
        primary_metric: str,
        collate: Collator,
        teacher: nn.Module | None = None,
        distill: DistillationLoss | None = None,
        prune: PruneConfig | None = None,
        fixed_masks: Mapping[str, Tensor] | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        checkpoint_dir: str | Path | None = None,
    ):
        if (teacher is None) != (distill is None):
            raise ValueError("distillation needs both a teacher and a DistillationLoss")
        if teacher is not None and teacher is model:
            raise ValueError("the teacher must be a separate copy: freezing it would freeze the student too")
        if prune is not None and fixed_masks is not None:
            raise ValueError("pruning learns the masks; fixed_masks is for fine-tuning a pruned structure")
        if len(train_data) == 0 or len(eval_data) == 0:
            raise ValueError(f"empty data: {len(train_data)} training and {len(eval_data)} evaluation examples")
        self.config = config
        self.train_data, self.eval_data = train_data, eval_data
        self.metric_fn, self.primary_metric, self.collate = metric_fn, primary_metric, collate
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.processes = Processes.from_environment(cpu=config.device == "cpu")
        self.device = self.processes.device if self.processes.world_size > 1 and config.device == "auto" else resolve_device(config.device)
        self.bf16 = config.bf16 and supports_bf16(self.device)
        if config.bf16 and not self.bf16:
            # fp32 rather than fp16 with a gradient scaler: a scaler skips steps on overflow
            # while the learning-rate schedule and the sparsity warm-up advance by step count;
            # the GPUs without bf16 (before Ampere: V100, T4) and CPUs without AVX-512-BF16
            # or AMX train correctly in fp32, and many times faster than in emulated bf16
            log.warning("%s has no native bf16: training in fp32", device_name(self.device))
        use_tf32(self.device)
        if config.batch_size < self.processes.world_size * config.accumulation_steps:
            raise ValueError(
                f"batch_size={config.batch_size} is smaller than processes ({self.processes.world_size}) × "
                f"accumulation_steps ({config.accumulation_steps}): some micro-batches would be empty"
            )

        torch.manual_seed(config.seed)  # gates' initial log α and any fresh weights: the same on every process
        self.model = model.to(self.device)
        self._compiled_student = self._compile(self.model) if config.compile else None
        self.fixed_masks = {k: v.to(self.device) for k, v in fixed_masks.items() if v is not None} if fixed_masks else None

        self.steps_per_epoch = steps_per_epoch(len(train_data), config.batch_size)
        lengths = [len(e["input_ids"]) for e in train_data]
        self.lengths = lengths if config.group_by_length else None
        self.total_steps = max(1, round(config.epochs * self.steps_per_epoch))
        # the teacher's outputs are worth keeping only where an example comes twice: more than one epoch
        cache_bytes = int(config.teacher_cache_gb * 2**30) if self.total_steps > self.steps_per_epoch else 0
        self.distillation: Distillation | None = (
            distill.with_teacher(teacher, self.device, lengths, cache_bytes) if distill is not None else None)
        self.eval_steps = config.eval_steps or self.steps_per_epoch

        if config.freeze_word_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        trainable += list(self.distillation.loss.parameters()) if self.distillation else []
        # fused: one kernel per step instead of ~10 full passes over the weights;
        # on CPU that is ~4x faster for all-MiniLM-L6-v2 (memory-bound update).
        # The meta device (shape-only test runs) has no fused kernel.
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=self.device.type != "meta"
        )
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(config.warmup_ratio * self.total_steps), self.total_steps
        )

        self.pruning: Pruning | None = (
            prune.start(model.config, config.epochs, self.steps_per_epoch, self.total_steps, self.device)
            if prune is not None else None)

        self.step = 0
        self.evaluations: list[dict[str, float]] = []
        self.history: list[dict[str, float]] = []
        self._unread: list[tuple[int, dict[str, Tensor], float]] = []  # (step, device values, lr) not yet read
        self.best: dict[str, Any] | None = None  # {"step", "metrics", "state"}
        self._signals: list[int] = []  # stop signals received (filled during fit)
        self._bar = tqdm(disable=True)  # the progress bar of fit
        self._stop = False
        if self.processes.world_size > 1:  # same weights everywhere; different dropout draws per process
            torch.manual_seed(config.seed + 1_000_003 * self.processes.rank)

    # ----------------------------------------------------------------- one step
    def _compile(self, model: nn.Module) -> nn.Module:
        """``model``'s compiled training forward (its parameters shared, so the optimisers
        and checkpoints see ``self.model`` as ever)."""
        if hasattr(model, "static_shapes"):
            model.static_shapes = True
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(model, mode=mode)

    def _student(self, *inputs: Tensor, **kwargs: Any) -> Any:
        """The student's training forward: compiled where ``config.compile`` is on and
        compilation works, else eager."""
        if self._compiled_student is not None:
            try:
                return self._compiled_student(*inputs, **kwargs)
            except COMPILE_ERRORS as e:
                log.warning("torch.compile of the training step failed (%s: %s); training eagerly",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self._compiled_student = None
        return self.model(*inputs, **kwargs)

    @property
    def teacher_cache(self) -> TeacherCache | None:
        """Where the teacher's outputs are kept (None: computed each step, or no teacher)."""
        return self.distillation.cache if self.distillation is not None else None

    def _pruning(self, step: int) -> bool:
        return self.pruning is not None and self.pruning.active(step)

    def _losses(self, batch: dict[str, Tensor], examples: list[int], step: int,
                noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Every loss part of one micro-batch (of the training examples ``examples``): the
        gold-label loss "ce", or the distillation parts "pred", "layer" and "distill"
        (means over the micro-batch, combined by ``_data_loss``), and, while pruning, the
        "lagrangian" (a global term). ``noise``: the step's mask noise (pruning)."""
        pruning = self._pruning(step)
        masks = self.pruning.gates.sample(noise) if pruning else self.fixed_masks
        distillation = self.distillation
        hidden = distillation is not None and distillation.needs_hidden_states
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        with autocast(self.device, self.bf16):
            with training_attention(self.device, self.bf16):
                student = self._student(*inputs, labels=batch.get("labels"), masks=masks, output_hidden_states=hidden)
            if distillation is not None:
                teacher = distillation.teacher_outputs(examples, inputs)
        if distillation is None:
            parts = {"ce": student.loss}
        else:
            parts = distillation.parts(student, teacher, batch["attention_mask"], masks, self.model.config)
        if pruning:
            parts |= self.pruning.losses(step)  # on the device, no host read
        return parts

    def _data_loss(self, parts: Mapping[str, Tensor], scales: Mapping[str, float]) -> Tensor:
        """A micro-batch's share of the global batch's data loss: the gold-label loss, or
        w · L_pred + (1 − w) · L_layer, each part weighted by ``scales`` (its share of the
        examples, or of the tokens)."""
        if self.distillation is None:
            return parts["ce"] * scales["ce"]
        return self.distillation.data_loss(parts, scales)

    def _optimizers(self, step: int) -> list[torch.optim.Optimizer]:
        optimizers = [self.optimizer]
        if self._pruning(step):
            optimizers += self.pruning.optimizers
        return optimizers

    def _trained_parameters(self, step: int) -> list[nn.Parameter]:
        return [p for opt in self._optimizers(step) for g in opt.param_groups for p in g["params"]]

    def _optimise(self, step: int) -> Tensor:
        """Gradients of every process summed (each already weighted by its share of the
        global batch), then one identical update everywhere: weights, gates and λ stay
        the same on every process by construction. Returns the gradient norm, on the
        device (a non-finite one is caught when the host reads it)."""
        for p in self._trained_parameters(step):
            if p.grad is None:  # a sublayer every head or unit of which was left out of this step
                # (modeling_cofi): the zero gradient of the masked computation, so AdamW moves it as before
                p.grad = torch.zeros_like(p)
        if self.processes.world_size > 1:
            self.processes.sum_gradients(self._trained_parameters(step))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        for opt in self._optimizers(step):
            opt.step()
        self.scheduler.step()
        if self._pruning(step):
            self.pruning.gates.clamp_()
        return grad_norm

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        masks = self.fixed_masks
        metrics: dict[str, float] = {}
        self.read_logged()
        if self._pruning(self.step - 1):
            masks, metrics = self.pruning.evaluation()
        preds, labels = self._predict(masks)
        metrics.update(self.metric_fn(preds, labels))
        metrics["step"] = self.step
        return metrics

    def _predict(self, masks: Mapping[str, Tensor] | None) -> tuple[np.ndarray, np.ndarray]:
        """Every process predicts its share (examples rank, rank + N, ...); the shares are
        gathered back into dataset order, so each example counts exactly once."""
        n, world = len(self.eval_data), self.processes.world_size
        if world == 1:
            return predict(self.model, self.eval_data, self.collate, masks, self.config.eval_batch_size, self.bf16)
        mine = list(range(self.processes.rank, n, world))
        preds, _ = predict(self.model, [self.eval_data[i] for i in mine], self.collate, masks,
                           self.config.eval_batch_size, self.bf16)
        gathered = self.processes.gather(list(zip(mine, preds.tolist())))
        ordered = sorted(gathered)
        if [i for i, _ in ordered] != list(range(n)):
            raise RuntimeError(f"evaluation gathered {len(ordered)} predictions for {n} examples")
        labels = np.array([self.eval_data[i]["label"] for i in range(n)])
        return np.array([p for _, p in ordered]), labels

    def _is_candidate(self, metrics: Mapping[str, float]) -> bool:
        return self.pruning is None or self.pruning.is_candidate(metrics)

    def _modules(self) -> dict[str, nn.Module]:
        """Every trained module, by its name in checkpoints."""
        modules = {"model": self.model}
        if self.distillation is not None:
            modules["distill"] = self.distillation.loss
        if self.pruning is not None:
            modules |= {"gates": self.pruning.gates, "lagrangian": self.pruning.lagrangian}
        return modules

    def _weights(self) -> dict[str, Any]:
        """The weights of a candidate for the best checkpoint (λ is not part of the model)."""
        return {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
                for k, m in self._modules().items() if k != "lagrangian"}

    def _load_weights(self, state: Mapping[str, Any]) -> None:
        for k, m in self._modules().items():
            if k != "lagrangian":
                m.load_state_dict(state[k])

    def _record_evaluation(self, metrics: dict[str, float]) -> None:
        self.evaluations.append(metrics)
        for cb in self.callbacks:
            cb.on_evaluate(self.step, metrics)
        if self._is_candidate(metrics) and (
            self.best is None or metrics[self.primary_metric] > self.best["metrics"][self.primary_metric]
        ):
            self.best = {"step": self.step, "metrics": metrics, "state": self._weights()}

    # -------------------------------------------------------------- checkpoints
    def _training_state(self) -> TrainingState:
        """Everything a step changes, for cofi.checkpoint; each process's global random
        states (dropout, mask draws) are saved with it."""
        optimizers = [self.optimizer, *(self.pruning.optimizers if self.pruning is not None else [])]
        return TrainingState(list(self._modules().values()), optimizers, [self.scheduler], generators={})

    def _progress(self) -> dict[str, Any]:
        return {"step": self.step, "evaluations": self.evaluations, "history": self.history, "best": self.best}

    def save_checkpoint(self) -> None:
        """Every process saves its random states; the main process writes the rest."""
        self.read_logged()  # a non-finite step raises here, before the last good checkpoint is replaced
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.step, self._training_state(), self._progress(), self.processes)

    def _resume(self) -> None:
        progress = load_checkpoint(self.checkpoint_dir, self._training_state(), self.processes)
        if progress is None:
            return
        self.step = progress["step"]
        self.evaluations, self.history, self.best = progress["evaluations"], progress["history"], progress["best"]
        log.info("resumed from step %d of %d", self.step, self.total_steps)
        self._refill_teacher_cache()

    # --------------------------------------------------------------------- fit
    def fit(self, resume: bool = True) -> TrainResult:
        if resume and self.checkpoint_dir is not None:
            self._resume()
        if self.config.evaluate_at_start and self.step == 0:
            self._record_evaluation(self.evaluate())
        self.model.train()
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                         disable=not (self.config.progress and self.processes.is_main))
        with _deferred_stop_signals() as self._signals:
            while self.step < self.total_steps:
                epoch, done = divmod(self.step, self.steps_per_epoch)
                order = epoch_order(len(self.train_data), epoch, self.config.seed, self.lengths, self.config.batch_size)
                for start in range(done * self.config.batch_size, len(order), self.config.batch_size):
                    self.train_step(order[start : start + self.config.batch_size].tolist())
                    if self.step % self.config.log_steps == 0:
                        self.read_logged()
                    if self.step % self.eval_steps == 0 or self.step == self.total_steps:
                        self._record_evaluation(self.evaluate())
                        self.save_checkpoint()
                    # between steps, so the checkpoint is a consistent state; several processes
                    # agree on a stop when they read the logged values together
                    if self._stop if self.processes.world_size > 1 else self._signals:
                        self._bar.close()
                        self.save_checkpoint()
                        signum = self._signals[0] if self._signals else signal.SIGTERM  # another process's
                        raise TrainingInterrupted(signum, self.step, self.checkpoint_dir is not None)
                    if self.step == self.total_steps:
                        break
        self.read_logged()
        self._bar.close()
        return self._finish()

    def _refill_teacher_cache(self) -> None:
        """The teacher cache as the uninterrupted run held it at this step: filled by epoch
        0's micro-batches up to here (every example is new in epoch 0). The teacher is in
        eval mode, so this draws no random numbers."""
        if self.teacher_cache is None:
            return
        size = self.config.batch_size
        order = epoch_order(len(self.train_data), 0, self.config.seed, self.lengths, size)
        for start in range(0, min(self.step, self.steps_per_epoch) * size, size):
            for examples in self._micro_batches(order[start : start + size].tolist()):
                batch = self._device_batch(examples)
                with autocast(self.device, self.bf16):
                    self.distillation.teacher_outputs(
                        examples, (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))

    def _device_batch(self, examples: list[int]) -> dict[str, Tensor]:
        return _to(self.collate([self.train_data[i] for i in examples]), self.device)

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This process's share of a global batch (every N-th example from its rank),
        cut into ``accumulation_steps`` micro-batches."""
        mine = indices[self.processes.rank :: self.processes.world_size]
        steps = self.config.accumulation_steps
        size = -(-len(mine) // steps)
        return [mine[i : i + size] for i in range(0, len(mine), size)]

    def train_step(self, indices: list[int]) -> None:
        """One optimizer step on the global batch ``indices``. Each micro-batch's loss
        is weighted by its share of the global batch (a mean over examples by its share
        of the examples, the layer loss, a mean over real tokens, by its share of the
        tokens), and the Lagrangian (a global term) by 1 / (number of micro-batches of
        all processes), so the summed gradients are those of the global batch: the same
        effective batch for any process count. While pruning, every micro-batch's masks
        come from the step's one noise draw. (Dynamic layer matching still chooses per
        micro-batch.) Nothing here waits for the device: the logged values are kept as
        device tensors."""
        step = self.step
        micro = self._micro_batches(indices)
        share = 1.0 / (self.processes.world_size * len(micro))
        tokens = sum(len(self.train_data[i]["input_ids"]) for i in indices)  # of the global batch, on the host
        for opt in self._optimizers(step):
            opt.zero_grad(set_to_none=True)
        noise = self.pruning.noise(self.config.seed, step) if self._pruning(step) else None
        logged: dict[str, Tensor] = {}
        for examples in micro:
            batch = self._device_batch(examples)
            parts = self._losses(batch, examples, step, noise)
            scales = {k: len(examples) / len(indices) for k in PER_EXAMPLE_PARTS}
            scales |= {k: sum(len(self.train_data[i]["input_ids"]) for i in examples) / tokens for k in PER_TOKEN_PARTS}
            data = self._data_loss(parts, scales)
            lagrangian = parts.get("lagrangian")
            loss = data + (lagrangian * share if lagrangian is not None else 0.0)
            loss.backward()
            # per-example and per-token parts summed by their weights, global ones averaged
            weighted = {k: v * scales.get(k, share) for k, v in parts.items() if k != "distill"}
            weighted |= {"data": data, **({"distill": data} if "distill" in parts else {})}
            for k, v in weighted.items():
                logged[k] = logged.get(k, 0.0) + v.detach().float()
        # the same on every process (after the gradients' all-reduce): its share, as the
        # logged values are summed over processes when read
        logged["grad_norm"] = self._optimise(step).float() / self.processes.world_size
        self._unread.append((step, logged, self.scheduler.get_last_lr()[0]))
        self.step += 1
        self._bar.update(1)

    def read_logged(self) -> None:
        """Read every unread step's values from the device in one transfer (summed over
        processes in one all-reduce, with the processes' stop flags), check them, and
        hand them to the history and the callbacks in step order."""
        if not self._unread:
            return
        flat = torch.cat([torch.stack(list(values.values())) for _, values, _ in self._unread])
        if self.processes.world_size > 1:
            stop = torch.full((1,), float(bool(self._signals)), device=flat.device)
            flat = self.processes.sum(torch.cat([flat, stop]))
            self._stop = bool(flat[-1] > 0)
            flat = flat[:-1]
        numbers = iter(flat.tolist())  # the one host read
        unread, self._unread = self._unread, []
        for step, values, learning_rate in unread:
            read = {k: next(numbers) for k in values}
            read["loss"] = read.pop("data") + read.get("lagrangian", 0.0)
            read["learning_rate"] = learning_rate
            bad = {k: v for k, v in read.items() if not math.isfinite(v) and k not in ("lambda_1", "lambda_2")}
            if bad:
                what = "gradient norm" if set(bad) == {"grad_norm"} else "loss"
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in read.items())
                    + ". Lower the learning rate or turn bf16 off. The last good checkpoint is unchanged."
                )
            self.history.append({"step": step + 1, **read})
            for cb in self.callbacks:
                cb.on_step(step + 1, read)
        shown = {k: read[k] for k in ("loss", "pred", "layer", "lagrangian", "mask_sparsity", "target_sparsity",
                                      "predicted_speedup", "target_speedup") if k in read}
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def _finish(self) -> TrainResult:
        target_reached = self.best is not None
        if not target_reached:  # pruning never came within tolerance of the target: keep the final weights
            last = self.evaluations[-1]
            self.pruning.warn_target_missed(last)
            self.best = {"step": self.step, "metrics": last, "state": self._weights()}
        self._load_weights(self.best["state"])
        return TrainResult(
            best_step=int(self.best["step"]),
            best_metrics=dict(self.best["metrics"]),
            evaluations=list(self.evaluations),
            masks=self.pruning.gates.deterministic() if self.pruning is not None else None,
            history=list(self.history),
            target_reached=target_reached,
        )
